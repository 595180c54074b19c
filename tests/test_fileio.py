"""Publishing a directory (`glm4_jax.fileio.staging_dir`): claimed at the start, never replacing what it must not,
one atomic swap, temporaries of live writers told apart from those of killed ones."""

from __future__ import annotations

import pytest

from glm4_jax import fileio


def hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_new_dst_is_claimed_at_once_and_published(tmp_path):
    dst = tmp_path / "dst"
    with fileio.staging_dir(dst) as tmp:
        assert dst.is_dir() and not any(dst.iterdir())  # claimed: an empty directory
        with pytest.raises(FileExistsError), fileio.staging_dir(dst):
            pass  # a second writer fails from the start
        assert fileio.stale_temporaries(dst) == []  # ours is locked: a live writer's
        (tmp / "a.txt").write_text("new")
    assert (dst / "a.txt").read_text() == "new" and hidden(tmp_path) == []


def test_something_put_into_the_claimed_dst_is_never_replaced(tmp_path):
    dst = tmp_path / "dst"
    with pytest.raises(FileExistsError, match="something was put there"), fileio.staging_dir(dst) as tmp:
        (tmp / "a.txt").write_text("new")
        (dst / "notes.txt").write_text("mine")
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"] and hidden(tmp_path) == []


def test_failure_removes_the_claim_and_the_temporary(tmp_path):
    dst = tmp_path / "dst"
    with pytest.raises(KeyboardInterrupt), fileio.staging_dir(dst) as tmp:
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt
    assert not dst.exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_swaps_in_one_step_and_asks_replaceable(tmp_path, monkeypatch, exchange):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    asked = []
    swapped = []
    real = fileio._exchange

    def exchange_or_not(a, b):
        swapped.append(real(a, b) if exchange else False)
        return swapped[-1]

    monkeypatch.setattr(fileio, "_exchange", exchange_or_not)
    with pytest.raises(FileExistsError), fileio.staging_dir(dst):
        pass
    with fileio.staging_dir(dst, overwrite=True, replaceable=asked.append) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"] and hidden(tmp_path) == []
    assert asked == [dst, dst]  # at the start and right before the swap
    assert swapped == [exchange]  # True: this filesystem has RENAME_EXCHANGE, the swap is atomic


def test_replaceable_refusing_before_the_swap_keeps_the_old(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    calls = []

    def refuse_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise ValueError("changed meanwhile")

    with pytest.raises(ValueError, match="changed"), fileio.staging_dir(dst, overwrite=True, replaceable=refuse_second):
        pass
    assert (dst / "old.txt").read_text() == "old" and hidden(tmp_path) == []


def test_stale_temporaries_of_killed_writers(tmp_path):
    dst = tmp_path / "dst"
    (tmp_path / ".dst.tmp-deadbeef").mkdir()
    (tmp_path / ".dst.old-deadbeef").mkdir()
    (tmp_path / ".other.tmp-deadbeef").mkdir()
    (tmp_path / ".dst.tmp-link").symlink_to(tmp_path)
    names = sorted(p.name for p in fileio.stale_temporaries(dst))
    assert names == [".dst.old-deadbeef", ".dst.tmp-deadbeef"]
