"""Evaluation on plain objects: the paper's Table-I protocol (`table1`), its entity words
(`words`), the table writers and the paper's numbers (`tables`, `paper_table1`) and the
user-study kit (`user_study`). The tasks (`semani.tasks`) build the objects from a config and
make one call."""
