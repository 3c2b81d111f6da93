"""Where results and models are written: checked before any work, never touching what we did not
create, and replaced atomically.

The rules, the same for every command:
- An output location is checked before a model is loaded or fitted: it must be a folder (or not
  exist yet), it must be writable (probed by writing, which also catches read-only mounts and
  root-owned folders for non-root users), and it must not be the current directory, one of its
  ancestors, or a folder holding what the command reads (its data, its model).
- A model folder is replaced only if it *is* a defectlens model: its config.json parses and
  carries our format marker, and it holds nothing but config.json and model.safetensors. A folder
  with anything else in it (a user's notes, evaluate results) is refused, never deleted. A
  symbolic link is refused rather than followed or replaced.
- Replacement is atomic at every instant: the new model is written into a hidden temporary
  sibling, then swapped with the old one in one `renameat2(RENAME_EXCHANGE)` call where the OS
  supports it (else: old moved aside, new renamed in, old removed last). Hidden leftovers of a
  save that was killed (`.NAME.defectlens-tmp-PID-*`, `.NAME.defectlens-old-PID-*`) are removed
  by the next save to the same place once their process is gone, and named by `load` when a
  model is missing because of one.
- A results folder (evaluate, predict) gets a marker file when we first write into it; files we
  produce are overwritten only in a folder carrying our marker, so a user's own `results.csv`
  is never replaced. A model, export or registration folder never takes results, and a results
  folder created for a run that fails before writing anything is removed (`results_dir`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from defectlens.errors import DefectLensWarning, ModelFileError, OutputError, option

MODEL_FORMAT = "defectlens-model"
MODEL_CONFIG = "config.json"
MODEL_TENSORS = "model.safetensors"
MODEL_FILES = frozenset({MODEL_CONFIG, MODEL_TENSORS})
# What a user may keep in a model folder beside the model: an evaluation's metrics.json, which
# `serve` shows on the model card. A save that replaces the model carries it over (serve shows
# it only while its threshold is the model's).
MODEL_EXTRAS = frozenset({"metrics.json"})
EXPORT_FORMAT = "defectlens-export"
REGISTRATION_FORMAT = "defectlens-registration"
RESULTS_MARKER = ".defectlens-results.json"
RESULTS_FORMAT = "defectlens-results"
_FORMAT_NAMES = {
    MODEL_FORMAT: "a defectlens model (from `fit`)",
    EXPORT_FORMAT: "a deployment export (from `export`: predict and serve take it as it is)",
    REGISTRATION_FORMAT: "a RegAD registration model (from `regad train`: give it to "
    "`fit --method regad --registration DIR`)",
}
_TMP_TAG = "defectlens-tmp"
_OLD_TAG = "defectlens-old"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (model files reach gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_folder_config(path: Path, what: str, fmt: str) -> tuple[Path, dict]:
    """(config path, config) of a model or export folder whose config.json is a JSON object
    with `format` == fmt; every problem is a one-line ModelFileError naming the file."""
    if not path.is_dir():
        if path.exists():
            raise ModelFileError(f"{path}: not a {what} directory (it is a file)")
        raise ModelFileError(f"{path}: no such {what} directory{interrupted_save_hint(path)}")
    config_path = path / MODEL_CONFIG
    if not config_path.is_file():
        raise ModelFileError(f"{path}: not a defectlens {what} (missing {MODEL_CONFIG})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelFileError(f"{config_path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # JSON and UTF-8 decoding errors
        raise ModelFileError(f"{config_path}: corrupt JSON ({str(exc)[:120]})") from None
    if not isinstance(config, dict) or config.get("format") != fmt:
        kind = config.get("format") if isinstance(config, dict) else None
        found = _FORMAT_NAMES.get(kind) if isinstance(kind, str) else None  # any JSON value
        if found is not None:  # one of ours, of another kind: say which, and what it is for
            raise ModelFileError(f"{path}: is {found}, not a defectlens {what}")
        raise ModelFileError(f"{config_path}: not a defectlens {what} config")
    return config_path, config


def _describe_os_error(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _read_config(config_path: Path, fmt: str) -> dict | None:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) and config.get("format") == fmt else None


def _entries(path: Path) -> set[str] | None:
    if path.is_symlink() or not path.is_dir():
        return None
    try:
        return {p.name for p in path.iterdir()}
    except OSError:
        return None


def is_model_folder(path: Path) -> bool:
    """A real (not linked) folder with only our model files and a config parsing as ours."""
    names = _entries(path)
    return (
        bool(names)
        and names <= MODEL_FILES | MODEL_EXTRAS
        and _read_config(path / MODEL_CONFIG, MODEL_FORMAT) is not None
    )


def is_registration_folder(path: Path) -> bool:
    """A real folder with only a registration model's two files (`defectlens regad train`)."""
    names = _entries(path)
    return (
        bool(names)
        and names <= MODEL_FILES
        and _read_config(path / MODEL_CONFIG, REGISTRATION_FORMAT) is not None
    )


def is_export_folder(path: Path) -> bool:
    """A real folder holding a deployment export's config and only the files it lists."""
    names = _entries(path)
    config = _read_config(path / MODEL_CONFIG, EXPORT_FORMAT) if names else None
    if config is None or not isinstance(config.get("files"), dict):
        return False
    return names <= {MODEL_CONFIG, *map(str, config["files"])}


def _within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def _refuse_protected(path: Path, protect: Iterable[str | Path], what: str) -> None:
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, resolved):
        where = "the current directory" if resolved == cwd else "an ancestor of the current one"
        raise OutputError(f"{path}: is {where}; give a new folder for the {what}")
    for item in protect:
        data = Path(item).resolve()
        if _within(data, resolved):
            raise OutputError(
                f"{path}: holds {item}, which this command reads; give a separate folder for "
                f"the {what}"
            )


def _probe_writable(folder: Path, shown: Path) -> None:
    """Create and remove a file in `folder`: the only reliable test (root, read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".defectlens-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputError(f"{shown}: cannot write there ({_describe_os_error(exc)})") from None


def _nearest_existing(path: Path) -> Path:
    current = path.absolute()
    # os.path.exists, not Path.exists: a name too long for the file system raises in the latter
    while not os.path.exists(current) and current != current.parent:
        current = current.parent
    return current


def _check_parent_chain(path: Path) -> None:
    """Every existing ancestor must be a folder (`file.txt/model` is refused) and writable."""
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise OutputError(f"{path}: {existing} is not a folder")
    _probe_writable(existing, path)


def _check_name_lengths(path: Path, extra: int = 0) -> None:
    """Refuse names the file system cannot hold, before any work (not at the final save).

    `extra` is what a temporary sibling adds to the last name (`.NAME.defectlens-tmp-PID-xxxx`).
    """
    existing = _nearest_existing(path.parent if str(path.parent) else Path("."))
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    parts = path.absolute().parts[len(existing.absolute().parts) :] or (path.name,)
    for i, part in enumerate(parts):
        size = len(os.fsencode(part)) + (extra if i == len(parts) - 1 else 0)
        if size > name_max:
            raise OutputError(
                f"{path}: the name {part[:40]!r}... is too long for the file system "
                f"({name_max} bytes at most{', with room for a temporary copy' if extra else ''})"
            )


def check_model_target(
    path: str | Path, protect: Iterable[str | Path] = (), kind: str = "model"
) -> Path:
    """Refuse, before any work, a model destination we must not or cannot write.

    `protect` lists the folders the command reads; the model must not replace them. `kind` is
    "model" (a saved model may be replaced), "export" (a deployment export may be) or
    "registration" (a registration model may be).
    """
    replaceable, what = {
        "model": (is_model_folder, "a defectlens model"),
        "export": (is_export_folder, "a defectlens export"),
        "registration": (is_registration_folder, "a defectlens registration model"),
    }[kind]
    if not str(path):
        raise OutputError(f"the {kind} folder's path is empty")
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        path = path.absolute()
    _check_name_lengths(path, extra=len(_tagged_name(path, _TMP_TAG)) - len(path.name))
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; give the {kind} folder's real path")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    _refuse_protected(path, protect, kind)
    _refuse_inside_saved(path, kind)
    if path.exists():
        try:
            entries = sorted(p.name for p in path.iterdir())
        except OSError as exc:
            raise OutputError(f"{path}: cannot read it ({_describe_os_error(exc)})") from None
        if entries and not replaceable(path):
            extra = [n for n in entries if n not in MODEL_FILES | MODEL_EXTRAS]
            shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
            reasons = [f"holds {shown}"] if extra else []
            if (path / MODEL_CONFIG).exists() or not extra:  # a damaged one says why
                reasons.append(f"its {MODEL_CONFIG} is not {what}'s or cannot be read")
            reason = "; ".join(reasons)
            raise OutputError(f"{path}: exists and is not {what} ({reason}); not replacing it")
        _probe_writable(path.parent.absolute(), path)
        # replacing it removes its files, which needs the folder itself writable: a model made
        # read-only is refused here, not half replaced (swapped in, the old copy left behind)
        _probe_writable(path, path)
    else:
        _check_parent_chain(path)
    return path


# -- atomic replacement ------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tagged_name(path: Path, tag: str) -> str:
    """`.NAME.TAG-PID-RANDOM`: hidden, tied to `path`, and to this process."""
    return f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _tagged_siblings(path: Path) -> list[tuple[Path, str, int]]:
    """(sibling, tag, pid) for every `_tagged_name` folder next to `path`."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        siblings = sorted(parent.iterdir())
    except OSError:
        return []
    prefix = f".{path.name}."
    found = []
    for sibling in siblings:
        rest = sibling.name[len(prefix) :] if sibling.name.startswith(prefix) else ""
        for tag in (_TMP_TAG, _OLD_TAG):
            pid_text = rest[len(tag) + 1 :].split("-", 1)[0]
            if rest.startswith(tag + "-") and pid_text.isdigit():
                found.append((sibling, tag, int(pid_text)))
    return found


def leftovers(path: Path) -> list[Path]:
    """Hidden siblings left by saves to `path` that were killed (their process is gone)."""
    return [sibling for sibling, _, pid in _tagged_siblings(path) if not _pid_alive(pid)]


def clean_leftovers(path: Path) -> list[Path]:
    """Remove what killed saves left next to `path` (only our own tagged folders)."""
    removed = []
    for item in leftovers(path):
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item)
    if removed:
        warnings.warn(
            f"removed {len(removed)} leftover folder(s) of an interrupted save next to {path}: "
            + ", ".join(p.name for p in removed),
            DefectLensWarning,
            stacklevel=2,
        )
    return removed


def temporary_sibling(path: Path) -> Path:
    """A new hidden folder next to `path`, tagged with our pid so a later save can clean it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / _tagged_name(path, _TMP_TAG)
    tmp.mkdir()
    return tmp


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the OS cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    path_arg = ctypes.c_char_p
    renameat2.argtypes = [ctypes.c_int, path_arg, ctypes.c_int, path_arg, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_folder(
    path: Path, write_tensors: Callable[[Path], None], config: dict, what: str
) -> None:
    """Write a model-like folder at `path` (already checked): `write_tensors(file)` writes
    model.safetensors, then config.json gets `config` plus that file's SHA-256. Assembled in a
    hidden sibling and swapped in atomically (see `replace_folder`); nothing is left behind on
    failure, and an OS error is one line naming `what` was being saved."""
    with assembling(path, f"saving the {what}") as tmp:
        write_tensors(tmp / MODEL_TENSORS)
        config = {**config, "tensors_sha256": file_sha256(tmp / MODEL_TENSORS)}
        (tmp / MODEL_CONFIG).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")


@contextmanager
def assembling(path: Path, what: str) -> Iterator[Path]:
    """A hidden sibling folder in which to assemble `path`. On normal exit its entries are made
    readable by all (mkdtemp/mkstemp make them private) and it replaces `path` atomically
    (`replace_folder`); on any failure it is removed and `path` is untouched, and an OS error
    becomes one line saying `what` failed."""
    clean_leftovers(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        for name in MODEL_EXTRAS:  # the user's own files in a model folder stay with it
            if (path / name).is_file() and not (path / name).is_symlink():
                shutil.copyfile(path / name, tmp / name)
        for item in [tmp, *tmp.iterdir()]:
            item.chmod(0o755 if item.is_dir() else 0o644)
        replace_folder(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: {what} failed ({exc.strerror or exc})") from None
        if isinstance(exc, SafetensorError):  # its writer's I/O errors, e.g. a full disk
            reason = (str(exc).strip().splitlines() or ["error"])[0][:200]
            raise OutputError(f"{path}: {what} failed ({reason})") from None
        raise


def replace_folder(new: Path, path: Path) -> None:
    """Put the finished folder `new` at `path`; the old content of `path` goes last."""
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):
        _remove_old_copy(new)  # `new` now holds the old model
        return
    aside = path.parent / _tagged_name(path, _OLD_TAG)
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    _remove_old_copy(aside)


def _remove_old_copy(old: Path) -> None:
    """After the swap the save has succeeded: failing to remove the previous copy is a
    warning that says where it is, not a failed save."""
    try:
        shutil.rmtree(old)
    except OSError as exc:
        warnings.warn(
            f"{old}: the previous copy could not be removed ({_describe_os_error(exc)}); "
            "the new one is saved, remove this folder by hand",
            DefectLensWarning,
            stacklevel=2,
        )


def interrupted_save_hint(path: Path) -> str:
    """Where the previous model went if a save to `path` was killed mid-swap ('' if nowhere)."""
    old = [sibling for sibling, tag, _ in _tagged_siblings(path) if tag == _OLD_TAG]
    if not old:
        return ""
    return f"; an interrupted save left the previous model in {old[-1]}: rename it back to {path}"


# -- results folders ---------------------------------------------------------------------------
def prepare_results_dir(
    path: str | Path,
    produces: Iterable[str],
    command: str,
    protect: Iterable[str | Path] = (),
    flag: str = "--out",
) -> Path:
    """Create (or reuse) a folder for results and mark it as ours, before any work. `flag`:
    the command-line option that names the folder, for the messages.

    A folder without our marker may be used when none of the files we would write exists in it.
    """
    if not str(path):
        raise OutputError("the results folder's path is empty")
    path = Path(path)
    _check_name_lengths(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    for item in protect:
        if path.exists() and path.resolve() == Path(item).resolve():
            raise OutputError(f"{path}: is an input folder; give a separate folder for results")
    kind = _saved_kind(path)
    if kind is not None:
        raise OutputError(
            f"{path}: is {kind} folder; results go in a folder of their own (choose another "
            f"{option(flag, 'output folder')})"
        )
    _refuse_inside_saved(path, "results")
    previous = read_results_marker(path)
    if previous.get("command") not in (None, command):  # two commands' files, mixed
        raise OutputError(
            f"{path}: holds the results of `defectlens {previous['command']}`; give "
            f"`defectlens {command}` a folder of its own"
        )
    if path.is_dir() and not is_results_folder(path):
        taken = [n for n in produces if (path / n).exists() or (path / n).is_symlink()]
        if taken:
            raise OutputError(
                f"{path}: already holds {', '.join(taken)} that defectlens did not write; "
                "choose an empty or new folder"
            )
    if not path.exists():
        _check_parent_chain(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create it ({_describe_os_error(exc)})") from None
    write_results_marker(path, {**previous, "command": command})
    return path


def _refuse_inside_saved(path: Path, what: str) -> None:
    """Nothing is written inside a model, export or registration folder: the folder would no
    longer be one that can be replaced (a later fit or threshold change there is refused)."""
    parent = path.absolute().parent
    kind = _saved_kind(parent)
    if kind is not None:
        raise OutputError(
            f"{path}: is inside {kind} folder ({parent}); put the {what} folder beside it"
        )


def _saved_kind(path: Path) -> str | None:
    """'a model' / 'an export' / 'a registration model' if `path` holds the config.json of one
    (even beside other files), else None: results must never be mixed into such a folder."""
    for fmt, kind in (
        (MODEL_FORMAT, "a model"),
        (EXPORT_FORMAT, "an export"),
        (REGISTRATION_FORMAT, "a registration model"),
    ):
        if _read_config(path / MODEL_CONFIG, fmt) is not None:
            return kind
    return None


@contextmanager
def results_dir(
    path: str | Path,
    produces: Iterable[str],
    command: str,
    protect: Iterable[str | Path] = (),
    flag: str = "--out",
) -> Iterator[Path]:
    """`prepare_results_dir`, undone if the body fails before writing anything: a folder this
    call created and that still holds only our marker is removed, so a failed run (a missing
    model, no inputs) leaves no folder that looks like results and blocks the corrected rerun."""
    created = not Path(path).exists()
    out_dir = prepare_results_dir(path, produces, command, protect, flag)
    try:
        yield out_dir
    except BaseException:
        if created and _entries(out_dir) == {RESULTS_MARKER}:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def clear_results(path: Path, produces: Iterable[str]) -> None:
    """Remove an earlier run's outputs (`produces`: files or folders) from a results folder of
    ours, so that none of them is left beside the new run's (e.g. another model's maps)."""
    if not is_results_folder(path):
        return
    for name in produces:
        item = path / name
        if item.is_symlink() or item.is_file():
            item.unlink()
        elif item.is_dir():
            shutil.rmtree(item)


def refuse_unwritten(path: Path, names: Iterable[str], because: str) -> None:
    """Before an earlier run's outputs are cleared: `names` are outputs that run recorded it
    did not write (`because` says why, e.g. it ran with --no-images). If they exist now,
    somebody else put them there, and starting again must not delete them."""
    foreign = [n for n in names if (path / n).exists() or (path / n).is_symlink()]
    if foreign:
        raise OutputError(
            f"{path}: holds {' and '.join(foreign)} that defectlens did not write ({because}); "
            f"move them, or choose another {option('--out', 'output folder')}"
        )


def read_results_marker(path: Path) -> dict:
    """What an earlier run recorded about a results folder ({} if none or unreadable)."""
    try:
        marker = json.loads((path / RESULTS_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return marker if isinstance(marker, dict) and marker.get("format") == RESULTS_FORMAT else {}


def write_results_marker(path: Path, info: dict) -> None:
    try:
        text = json.dumps({**info, "format": RESULTS_FORMAT}) + "\n"
        (path / RESULTS_MARKER).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there ({_describe_os_error(exc)})") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: a reader (or a kill) never sees half of it. The data
    goes to a sibling under a short hashed name first, so a name near the file system's
    limit does not overflow it a second time; the sibling is removed if the write fails."""
    short = hashlib.sha256(path.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    tmp = path.with_name(f".{short}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`write_bytes_atomic` for text (UTF-8): a reader never sees half a metrics.json."""
    write_bytes_atomic(path, text.encode("utf-8"))


def is_results_folder(path: Path) -> bool:
    return (path / RESULTS_MARKER).is_file()
