"""Get the demo corpus into ``data/``: from the DVC remote if it has it, else by regenerating it.

The generator is deterministic, so a fresh clone that cannot reach the remote regenerates the
corpus and checks it against the hash in ``data.dvc`` before trusting it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomops.config import SynthConfig
from dicomops.errors import CorpusMismatchError
from dicomops.synthetic import generate_corpus, sidecars
from dicomops.synthetic.corpus import is_complete_corpus
from dicomops.tracking.lineage import dvc_directory_hash, read_dvc_pointer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusStatus:
    path: Path
    source: str  # "present", "pulled" or "generated"
    md5: str
    matches_pointer: bool | None  # None when there is no pointer to compare with
    pointer: Path | None = None  # the DVC pointer file compared with

    @property
    def verdict(self) -> str:
        """How the corpus compares with its pointer, naming the pointer file."""
        name = self.pointer.name if self.pointer else "its pointer"
        return {True: f"matches {name}", False: f"DOES NOT match {name}",
                None: "no pointer yet"}[self.matches_pointer]


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=1800)


# DVC refuses a pointer that git ignores ("bad DVC file name ... is git-ignored"), and a work
# directory is git-ignored. There DVC runs without git (``core.no_scm`` for that call only): it
# neither checks nor writes .gitignore, and the pointer is kept by whoever records it (a run's
# artifact), not by git. The repository's cache and remotes are the same.
_DVC_WITHOUT_GIT = """import sys
from dvc.repo import Repo
with Repo(sys.argv[1], config={"core": {"no_scm": True}}) as repo:
    getattr(repo, sys.argv[2])(sys.argv[3])
"""


def _dvc_without_git(command: str, target: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``dvc add`` or ``dvc push`` of `target` with git out of DVC's sight (see above)."""
    return subprocess.run([sys.executable, "-c", _DVC_WITHOUT_GIT, str(cwd), command, target], cwd=cwd,
                          capture_output=True, text=True, timeout=1800)


def _git_ignores(path: Path, repo: Path) -> bool:
    """Whether git ignores `path` (False where there is no git, or no git repository)."""
    try:
        return subprocess.run(["git", "check-ignore", "-q", str(path.relative_to(repo))], cwd=repo,
                              capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def ensure_corpus(data: Path, cfg: SynthConfig, *, pointer: Path | None = None, strict: bool = False,
                  track: bool = True, progress: Callable[[int, int], None] | None = None) -> CorpusStatus:
    """Make sure `data` holds the corpus `pointer` records (or `cfg` describes).

    Args:
        data: the corpus folder, e.g. ``data``.
        cfg: generator options used when the corpus has to be regenerated.
        pointer: the DVC pointer file (default ``<data>.dvc`` beside the folder).
        strict: raise :class:`CorpusMismatchError` when a regenerated corpus does not reproduce the
            pointer's hash (otherwise warn and go on with the regenerated data).
        track: after regenerating, ``dvc add`` the folder and push it to the default remote.
        progress: called with (series done, series total) while generating.
    """
    data = Path(data).resolve()
    pointer = Path(pointer) if pointer else data.with_name(data.name + ".dvc")
    expected = str(read_dvc_pointer(pointer)["md5"]) if pointer.exists() else None
    repo = pointer.resolve().parent
    if data.exists() and any(data.iterdir()):
        if is_complete_corpus(data):
            md5 = dvc_directory_hash(data)
            matches = None if expected is None else md5 == expected
            if matches is False:
                log.warning("corpus %s (md5 %s) is not the version %s records (%s): run 'dvc checkout "
                            "%s' to restore that version, or, if this one is meant, 'dvc add %s' and "
                            "commit %s", data, md5, pointer.name, expected, pointer.name, data.name,
                            pointer.name)
            _warn_other_options(data, cfg, "kept as it is")
            return CorpusStatus(data, "present", md5, matches, pointer)
        _refuse_incomplete(data, pointer)
    if expected is not None:
        pulled = _dvc("pull", pointer.name, cwd=repo)
        if pulled.returncode == 0 and data.exists() and any(data.iterdir()):
            _warn_other_options(data, cfg, f"the version {pointer.name} records")
            return CorpusStatus(data, "pulled", expected, True, pointer)
        log.info("dvc pull found no copy (%s); regenerating the corpus",
                 pulled.stderr.strip().splitlines()[-1] if pulled.stderr.strip() else "no output")
    generate_corpus(data, cfg, progress=progress)
    md5 = dvc_directory_hash(data)
    matches = None if expected is None else md5 == expected
    if matches is False:
        message = (f"regenerated corpus hash {md5} differs from {pointer.name} ({expected}); the "
                   "generator or a pinned dependency changed. If the change is intended, run "
                   f"'dvc add {data.name}' and commit {pointer.name}")
        if strict:
            raise CorpusMismatchError(message)
        log.warning(message)
    elif track:
        for args in (("add", data.name), ("push", pointer.name)):
            result = _dvc(*args, cwd=repo)
            if result.returncode != 0:
                log.warning("dvc %s failed: %s", args[0], result.stderr.strip()[-500:])
                break
    return CorpusStatus(data, "generated", md5, matches, pointer)


def _warn_other_options(data: Path, cfg: SynthConfig, what: str) -> None:
    """Warn when the corpus in `data` was made with other generator options than `cfg` asks for:
    a corpus there is kept (or pulled) whatever the options say, which only apply when it is made."""
    try:
        made = json.loads((data / sidecars.CORPUS_JSON).read_text())
    except (OSError, ValueError):
        return
    asked = cfg.model_dump()
    differ = sorted(k for k, v in made.items() if k in asked and asked[k] != v)
    if differ:
        log.warning("corpus %s is %s, made with %s, not the %s asked for: the options apply only when a "
                    "corpus is made. For a corpus of those options use another folder (make run SEED=N "
                    "DATA=data-N WORK=work-N), or remove this one", data, what,
                    ", ".join(f"{k} {made[k]}" for k in differ), ", ".join(f"{k} {asked[k]}" for k in differ))


def _refuse_incomplete(data: Path, pointer: Path) -> None:
    """`data` holds no ``corpus.json``, so it is no complete corpus (an interrupted 'dicomops data' of
    an older dicomops, or 'dvc pull'), or no corpus of ours at all: it is never deleted here, since
    it may be someone's files; the error says how to get the corpus."""
    raise ValueError(f"{data} has no {sidecars.CORPUS_JSON}, so it is not a complete corpus (an interrupted "
                     f"'dicomops data' or 'dvc pull'?); it is left as it is: remove it (rm -r {data}) and run "
                     f"again to regenerate it, run 'dvc checkout --force {pointer.name}' to restore the "
                     "recorded version, or choose another folder for the corpus")


@dataclass(frozen=True)
class SourceVersion:
    """One version of a DVC-tracked source folder (``<folder>.dvc`` beside it).

    ``md5`` is the folder's DVC md5 (``….dir``) whether or not DVC recorded it; ``pointer`` is None and
    ``note`` says why when it did not, and ``note`` also says when the push to the remote failed.
    """

    folder: Path
    md5: str
    pointer: Path | None
    pushed: bool
    note: str

    def tags(self, prefix: str) -> dict[str, str]:
        """What a run records of the version it used: ``<prefix>.dvc_md5`` and ``<prefix>.dvc``."""
        where = str(self.pointer) if self.pointer else f"not versioned: {self.note}"
        return {f"{prefix}.dvc_md5": self.md5, f"{prefix}.dvc": where}


def dvc_root(folder: Path) -> Path | None:
    """The DVC repository `folder` lies in (the nearest parent holding ``.dvc/``), or None."""
    for parent in Path(folder).absolute().parents:
        if (parent / ".dvc").is_dir():
            return parent
    return None


def version_source(folder: Path, files: dict[str, Path]) -> SourceVersion:
    """Make the source `folder` hold exactly `files` (name in the folder → file; unchanged files are not
    rewritten, others removed) and record the version with DVC (:func:`version_folder`).

    Outside a DVC repository, or when DVC fails, the folder is still written and the reason is in
    ``note`` (and the log): a source is never lost because it could not be versioned.
    """
    from filelock import FileLock

    from dicomops import io

    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    repo = dvc_root(folder)
    lock = (repo / ".dvc" / "tmp" if repo else folder.parent) / f"dicomops-{folder.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock), timeout=300):
        for name, path in files.items():
            target, data = folder / name, Path(path).read_bytes()
            if not (target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data):
                io.write_bytes(target, data)
        for stale in [p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in files]:
            stale.unlink()  # the folder is exactly this version
        for empty in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(empty.iterdir()):
                empty.rmdir()
        return version_folder(folder)


def version_folder(folder: Path) -> SourceVersion:
    """Record `folder` as it is with DVC: ``dvc add <folder>`` (``<folder>.dvc`` beside it; commit that
    file to keep the history in git) and ``dvc push`` to the default remote, so that the version can be
    checked out again (``dvc pull <folder>.dvc``) after its files are gone.

    Files that are symbolic links are recorded by their content, which DVC's cache and remote then
    hold: the version no longer depends on the files they pointed to. A folder git ignores (one in
    a work directory) is recorded without git (``_DVC_WITHOUT_GIT``): its pointer is not for git, so
    keep it where the run that used it is recorded. The caller holds whatever lock keeps others
    from writing the folder meanwhile.

    Outside a DVC repository, or when DVC fails, the folder is left as it is, ``pointer`` is None and
    ``note`` says why. DVC's own message goes to the log only: it may name a file of the folder, and
    ``note`` becomes a run's tag.
    """
    folder = Path(folder).absolute()
    md5 = dvc_directory_hash(folder)
    repo = dvc_root(folder)
    if repo is None:
        note = f"no DVC repository above {folder}: run 'dvc init' there, or place the folder inside one"
        log.warning("source %s not versioned: %s", folder, note)
        return SourceVersion(folder, md5, None, False, note)
    pointer = folder.with_name(folder.name + ".dvc")
    target, listed = str(folder.relative_to(repo)), str(pointer.relative_to(repo))
    ignored = _git_ignores(pointer, repo)
    added = _dvc_without_git("add", target, repo) if ignored else _dvc("add", target, cwd=repo)
    if added.returncode != 0:
        note = f"'dvc add {target}' failed (exit {added.returncode}); its message is in the log"
        log.warning("source %s not versioned: %s", folder, added.stderr.strip()[-300:])
        return SourceVersion(folder, md5, None, False, note)
    if not pointer.is_file():  # DVC recorded it in the output above that holds it (``dvc add`` of a part)
        note = (f"{folder} lies inside a folder DVC already tracks, which 'dvc add' updated instead of "
                f"writing {pointer.name}: keep the work directory out of DVC's outputs")
        log.warning("source %s not versioned: %s", folder, note)
        return SourceVersion(folder, md5, None, False, note)
    recorded = str(read_dvc_pointer(pointer)["md5"])
    pushed = _dvc_without_git("push", listed, repo) if ignored else _dvc("push", listed, cwd=repo)
    note = "" if pushed.returncode == 0 else (f"'dvc push {listed}' failed (exit {pushed.returncode}); its "
                                              "message is in the log")
    if note:
        log.warning("source %s versioned but not pushed: %s", folder, pushed.stderr.strip()[-300:])
    return SourceVersion(folder, recorded, pointer, pushed.returncode == 0, note)
