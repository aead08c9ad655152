"""Fetch the pretrained weights the paper configs read into `pretrained/`, and check them.

    python scripts/download_weights.py --list                   # what there is, and where it goes
    python scripts/download_weights.py --all [--force]          # everything a script can fetch
    python scripts/download_weights.py --only sd2-inpainting,clip-rn50
    python scripts/download_weights.py --check [--quick] [--experiments semani_diff]

The registry (`semani.utils.weight_files.REGISTRY`) gives each weight a short name, its source
(URLs, a Hugging Face repository, or the manual steps of a Google Drive release) and its target
under `--root` (default `pretrained/`, the configs' `paths.pretrained_dir`), in the layout the
configs read. A download goes to a temporary name (`.<name>.partial`) and is renamed when it is
complete and matches the checksum its source publishes; `<root>/MANIFEST.json` then records its
source, size and sha256. A weight already there is skipped (`--force`: fetched again). Without a
network each download fails on one line and the others are still tried; the exit status is 1
when anything selected is not there at the end.

`--check` needs no network: it composes every paper run (the Table-I evaluations, the trainings,
`manipulate.py` per method) from `configs/`, lists the files each reads (its `weights` entries
and, for Table I, the metrics' Inception and CLIP) and says which are missing or corrupt (size or
sha256 against the manifest; `--quick`: sizes only). Exit status 1 when any run lacks a file.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from semani.utils.atomic import replace_dir
from semani.utils.hub import first_line
from semani.utils.weight_files import (
    REGISTRY,
    WeightFile,
    find_entry,
    load_manifest,
    record_files,
    select_repo_files,
    verify,
)

log = logging.getLogger("download_weights")

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
_TABLE1 = [
    (f"eval.py protocol=table1 method={m} data={d}", "eval",
     ["protocol=table1", f"method={m}", f"data={d}"])
    for m in ("semani_trans", "semani_diff", "blended_ldm")
    for d in ("cub", "oxford", "coco")
]  # fmt: skip
_TRAIN = [
    (f"train.py experiment={e}", "train", [f"experiment={e}"])
    for e in (
        "semani_trans_cc12m_pretrain", "semani_trans_cub", "semani_trans_oxford",
        "semani_trans_coco", "semani_diff_cub", "semani_diff_oxford", "semani_diff_coco",
        "mask_prompt_coco",
    )
]  # fmt: skip
_MANIPULATE = [
    (f"manipulate.py method={m}", "manipulate", [f"method={m}"])
    for m in ("semani_diff", "semani_trans", "blended_ldm")
]
# (label, primary config, overrides) of every paper run `--check` looks at
EXPERIMENTS: list[tuple[str, str, list[str]]] = _TABLE1 + _TRAIN + _MANIPULATE


# ---------------------------------------------------------------------------------------------
# downloading


def fetch_url(url: str, path: Path) -> None:
    """Download `url` into the file `path` (a progress bar on stderr)."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "semani-download-weights"})
    with urllib.request.urlopen(request, timeout=60) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name.strip(".")) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                bar.update(len(block))


def snapshot(repo_id: str, local_dir: Path) -> None:
    """Download the files of `repo_id` its library reads (`select_repo_files`) into
    `local_dir` with huggingface_hub (resumable, its progress bars)."""
    from huggingface_hub import HfApi, snapshot_download

    files = select_repo_files(HfApi().list_repo_files(repo_id))
    snapshot_download(repo_id, local_dir=str(local_dir), allow_patterns=files)


def _check_sum(entry: WeightFile, rel: str, path: Path) -> None:
    """Raise ValueError when `path` does not match the checksum the source publishes."""
    if rel not in entry.checksums:
        return
    algorithm, expected = entry.checksums[rel]
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    if not h.hexdigest().startswith(expected):
        raise ValueError(f"{algorithm} {h.hexdigest()[:12]}... is not the published {expected}")


def _download_urls(entry: WeightFile, root: Path, force: bool) -> None:
    for rel, url in entry.urls:
        final = root / rel
        if not force and final.is_file() and rel in load_manifest(root):
            continue  # this file of the entry came whole in an earlier run
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.partial")
        try:
            fetch_url(url, tmp)
            _check_sum(entry, rel, tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
            _prune(final.parent, root)
        record_files(root, entry.name, url, [final])


def _download_repo(entry: WeightFile, root: Path) -> None:
    final = root / entry.target
    # a fixed temporary name: a second run resumes what an interrupted one left there
    tmp = root / f".{entry.target}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        snapshot(str(entry.repo_id), tmp)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
        if not any(tmp.iterdir()):
            raise FileNotFoundError(f"{entry.repo_id}: no file downloaded")
        replace_dir(tmp, final)
    finally:
        _prune(tmp, root)
    files = sorted(p for p in final.rglob("*") if p.is_file())
    record_files(root, entry.name, entry.source, files)


def _prune(folder: Path, root: Path) -> None:
    """Remove `folder` and its parents up to `root` while they are empty."""
    while folder != root and root in folder.parents and folder.is_dir():
        try:
            folder.rmdir()
        except OSError:  # not empty
            return
        folder = folder.parent


def _host(entry: WeightFile) -> str:
    url = f"https://huggingface.co/{entry.repo_id}" if entry.repo_id else entry.urls[0][1]
    return urllib.parse.urlsplit(url).netloc


def _no_connection(err: BaseException) -> bool:
    """Whether `err` (or what caused it) says the host cannot be reached at all (no network,
    DNS, refused, timed out, offline mode), rather than an HTTP answer or a bad file."""
    names = {"ConnectError", "ConnectTimeout", "TimeoutException", "OfflineModeIsEnabled"}
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, urllib.error.URLError) and isinstance(seen.reason, OSError):
            return True
        if isinstance(seen, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if type(seen).__name__ in names:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_present(entry: WeightFile, root: Path) -> bool:
    """Whether every file of `entry` is there (a folder: not empty)."""
    if entry.urls:
        return all((root / rel).is_file() for rel, _ in entry.urls)
    target = root / entry.target
    return target.is_file() or (target.is_dir() and any(target.iterdir()))


def download(
    entry: WeightFile, root: Path, force: bool = False, unreachable: dict[str, str] | None = None
) -> tuple[bool, str]:
    """Fetch one entry; (whether it is there now, one line saying what happened). Never
    raises for a failed download: the line names the weight and the error. `unreachable`
    ({host: error}, filled here): a host that could not be reached is not tried again."""
    unreachable = {} if unreachable is None else unreachable
    target = root / entry.target
    if is_present(entry, root) and not force:
        manifest = load_manifest(root)
        if entry.manual and not any(k.startswith(entry.target) for k in manifest):
            record_files(root, entry.name, entry.source, [target] if target.is_file() else [])
        return True, f"{entry.name}: already there ({target})"
    if entry.manual:
        steps = entry.manual.format(path=target).replace("\n", "\n    then: ")
        return False, f"{entry.name}: manual step, no script can fetch it:\n    {steps}"
    host = _host(entry)
    if host in unreachable:
        return False, f"{entry.name}: FAILED, {host} cannot be reached ({unreachable[host]})"
    try:
        if entry.repo_id:
            _download_repo(entry, root)
        else:
            _download_urls(entry, root, force)
    except Exception as err:  # network, HTTP, checksum, disk: one line, then the next entry
        log.debug("%s failed", entry.name, exc_info=True)
        if _no_connection(err):
            unreachable[host] = first_line(err)
        return False, f"{entry.name}: FAILED from {entry.source} ({first_line(err)})"
    return True, f"{entry.name}: downloaded to {target}"


# ---------------------------------------------------------------------------------------------
# checking


def compose(config_name: str, overrides: list[str]):
    """A config of `configs/` composed as the entry points do (Hydra's runtime node set)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import semani  # noqa: F401  (registers the config resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def requirements(cfg) -> list[tuple[str, str | None, str]]:
    """(config key, value or None when unset, how to get it) of every weight file `cfg` reads:
    its `weights` entries (as `semani.utils.weights.missing_weights` reads them) and the
    metrics' classifier and CLIP."""
    from omegaconf import OmegaConf

    from semani.utils.weights import missing_weights

    unset = {m.key for m in missing_weights(cfg) if m.path is None}
    out = []
    for key, maker in (cfg.get("weights") or {}).items():
        key = str(key)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if maker is None or node is None or leaf not in node:
            continue
        value = None if OmegaConf.is_missing(node, leaf) else node[leaf]
        if value is None and key not in unset:
            continue  # null: this run reads no weights there
        out.append((key, None if value is None else str(value), " ".join(str(maker).split())))
    metrics = cfg.get("metrics")
    if metrics is not None:
        for key in ("classifier.path", "clip_pretrained"):
            value = OmegaConf.select(metrics, key, default=None)
            if value is not None:
                out.append((f"metrics.{key}", str(value), "the Table-I metrics"))
    return out


def check(root: Path, quick: bool, only: str | None) -> int:
    """Print which paper runs have all their weight files, then every file with its state
    (ok, unverified: present but not in the manifest, missing, corrupt), how many of the runs
    read it and how to get it. 1 when a run lacks a file."""
    from semani.utils.weights import is_local_path

    manifest = load_manifest(root)
    runs = [e for e in EXPERIMENTS if not only or any(s in e[0] for s in only.split(","))]
    files: dict[str, dict] = {}  # path (or "<key> unset") -> state, detail, how, runs
    verdicts = []
    for label, config_name, overrides in runs:
        try:
            cfg = compose(config_name, [*overrides, f"paths.pretrained_dir={_quoted(root)}"])
            reqs = requirements(cfg)
        except Exception as err:  # a config that does not compose
            verdicts.append((label, f"ERROR {first_line(err)}"))
            continue
        lacking, seen = [], set()
        for key, value, maker in reqs:
            if value is not None and not is_local_path(value):
                continue  # a hub id or an open_clip tag: the loaders fetch it
            name = f"{key} (unset)" if value is None else _short(value, root)
            if name in seen:  # e.g. OVSeg's checkpoint, read by the segmenter and the scorer
                continue
            seen.add(name)
            if name not in files and value is None:
                how = f"pass {key}=<file>; made by: {maker}"
                files[name] = {"state": "unset", "detail": "", "how": how, "runs": 0}
            elif name not in files:
                state, detail = verify(root, value, manifest, quick)
                entry = find_entry(root, value)
                how = f"--only {entry.name}" if entry else maker
                files[name] = {"state": state, "detail": detail, "how": how, "runs": 0}
            files[name]["runs"] += 1
            if files[name]["state"] in ("missing", "corrupt", "unset"):
                lacking.append(name)
        verdicts.append((label, f"lacks {len(lacking)}: {', '.join(lacking)}" if lacking else
                         "ready"))  # fmt: skip
    width = max(len(label) for label, _ in verdicts) + 2 if verdicts else 10
    print(f"weights under {root} (manifest: {len(manifest)} files"
          f"{'; --quick: sizes only' if quick else ''})\n")  # fmt: skip
    print(f"{'run':<{width}}verdict")
    for label, verdict in verdicts:
        print(f"{label:<{width}}{verdict}")
    order = {"corrupt": 0, "missing": 1, "unset": 2, "unverified": 3, "ok": 4}
    rows = sorted(files.items(), key=lambda kv: (order[kv[1]["state"]], kv[0]))
    width = max((len(name) for name, _ in rows), default=4) + 2
    print(f"\n{'file':<{width}}{'state':<12}{'runs':>4}  get it / detail")
    for name, f in rows:
        bad = f["state"] in ("missing", "corrupt", "unset")
        tail = f["how"] + (f" ({f['detail']})" if f["detail"] else "") if bad else f["detail"]
        print(f"{name:<{width}}{f['state']:<12}{f['runs']:>4}  {tail}")
    ready = sum(v == "ready" for _, v in verdicts)
    counts: dict[str, int] = {}
    for f in files.values():
        counts[f["state"]] = counts.get(f["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"\n{ready} of {len(verdicts)} runs ready; files: {summary or 'none'}"
          "\n(--only <name>: python scripts/download_weights.py --only <name>)")  # fmt: skip
    return 0 if ready == len(verdicts) else 1


def _quoted(path: Path) -> str:
    """`path` as a quoted Hydra override value (spaces, `=` and commas survive)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _short(value: str, root: Path) -> str:
    """`value` relative to the pretrained folder when it is under it."""
    try:
        return Path(value).expanduser().absolute().relative_to(root).as_posix()
    except ValueError:
        return value


# ---------------------------------------------------------------------------------------------
# command line


def list_entries(root: Path) -> None:
    """Print the registry: name, kind, target (and whether it is there), what, source."""
    for e in REGISTRY:
        there = "present" if is_present(e, root) else "absent"
        print(f"{e.name:<24}{e.kind:<7}{e.target}  [{there}]")
        print(f"{'':<31}{e.what}")
        sources = [url for _, url in e.urls] or [e.source]
        for source in sources:
            print(f"{'':<31}from {source}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="list the weights and their targets")
    mode.add_argument("--all", action="store_true", help="fetch every weight")
    mode.add_argument("--only", help="fetch these (comma-separated names of --list)")
    mode.add_argument("--check", action="store_true", help="which paper runs lack which files")
    p.add_argument("--root", type=Path, default=Path("pretrained"), help="default: pretrained/")
    p.add_argument("--force", action="store_true", help="fetch again what is already there")
    p.add_argument("--quick", action="store_true", help="--check sizes only, no sha256")
    p.add_argument("--experiments", help="--check only the runs whose label contains one of "
                   "these (comma-separated), e.g. semani_diff,data=cub")  # fmt: skip
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root.expanduser().absolute()
    if args.list:
        list_entries(root)
        return 0
    if args.check:
        return check(root, args.quick, args.experiments)
    names = {e.name: e for e in REGISTRY}
    chosen = list(REGISTRY)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"error: unknown {', '.join(unknown)}; known: {', '.join(names)}",
                  file=sys.stderr)  # fmt: skip
            return 2
        chosen = [names[n] for n in wanted]
    root.mkdir(parents=True, exist_ok=True)
    results, unreachable = [], {}
    for entry in chosen:
        ok, line = download(entry, root, args.force, unreachable)
        print(line, flush=True)
        results.append(ok)
    missing = [e.name for e, ok in zip(chosen, results) if not ok]
    print(f"\n{len(chosen) - len(missing)} of {len(chosen)} there"
          + (f"; not there: {', '.join(missing)}" if missing else ""))  # fmt: skip
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
