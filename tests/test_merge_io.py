"""Merge I/O: kernel-side concatenation and its fallback, the block-wise unique-id check, InferenceRunner.merge."""

from __future__ import annotations

import errno
import os
import random

import pytest

import espnet3_rules.engine.files as files
import espnet3_rules.systems.base.inference_runner as inference_runner
from espnet3_rules import ContractError, InferenceRunner, concatenate_shard_files
from espnet3_rules.systems.base.inference_runner import (
    FIELD_KEYS_NAME,
    _check_unique_ids_exact,
    check_unique_ids,
    iter_id_blocks,
)


def make_shards(root, contents, field="hyp"):
    """``split.N/<field>.scp`` with the given bytes (``None``: no fragment) and ``field_keys.txt``."""
    dirs = []
    for i, data in enumerate(contents):
        shard_dir = root / f"split.{i}"
        shard_dir.mkdir(parents=True)
        if data is not None:
            (shard_dir / f"{field}.scp").write_bytes(data.encode() if isinstance(data, str) else data)
        (shard_dir / FIELD_KEYS_NAME).write_text(f"{field}\n")
        dirs.append(shard_dir)
    return dirs


CONTENTS = ["a 1\nb two words\n", None, "c 3\nd " + "x" * 300_000 + "\n", "", "é ü\n"]
JOINED = "".join(c for c in CONTENTS if c).encode()


# ------------------------------------------------------------------ concatenation
def count_calls(monkeypatch, name="copy_file_range", fail=None):
    """Wrap ``os.<name>`` so that calls are counted; ``fail(call_number)`` may raise instead."""
    real, calls = getattr(os, name), []

    def wrapped(*args):
        calls.append(args)
        if fail is not None:
            fail(len(calls), args)
        return real(*args)

    monkeypatch.setattr(os, name, wrapped)
    return calls


def test_concatenation_keeps_shard_order_skips_missing_and_uses_the_kernel_copy(tmp_path, monkeypatch):
    calls = count_calls(monkeypatch)
    dirs = make_shards(tmp_path, CONTENTS)
    out = tmp_path / "merged" / "hyp.scp"
    assert concatenate_shard_files(dirs, "hyp.scp", out)
    assert out.read_bytes() == JOINED
    assert len(calls) == 3, "one copy_file_range per non-empty fragment"
    assert sorted(p.name for p in out.parent.iterdir()) == ["hyp.scp"], "no temp file is left"
    assert concatenate_shard_files(list(reversed(dirs)), "hyp.scp", out)
    assert out.read_bytes() == "".join(c for c in reversed(CONTENTS) if c).encode()


@pytest.mark.parametrize("refusal", [errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP])
def test_a_refused_kernel_copy_falls_back_from_the_offset_reached(tmp_path, monkeypatch, refusal):
    real = os.copy_file_range

    def partial_then_refuse(src, dst, count, offset_src=None, offset_dst=None):
        if offset_src == 0:  # each fragment: 3 bytes by the kernel, the rest is refused
            return real(src, dst, min(count, 3), offset_src)
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "copy_file_range", partial_then_refuse)
    fallback = count_calls_copyfileobj(monkeypatch)
    dirs = make_shards(tmp_path, CONTENTS)
    assert concatenate_shard_files(dirs, "hyp.scp", tmp_path / "hyp.scp")
    assert (tmp_path / "hyp.scp").read_bytes() == JOINED
    assert fallback == [3, 3, 3], "every fragment continued in Python after its first 3 bytes"


def count_calls_copyfileobj(monkeypatch):
    """Record, per ``shutil.copyfileobj`` call, the source offset it started from."""
    real, offsets = files.shutil.copyfileobj, []

    def wrapped(src, dst, length=0):
        offsets.append(src.tell())
        return real(src, dst, length)

    monkeypatch.setattr(files.shutil, "copyfileobj", wrapped)
    return offsets


def test_a_kernel_copy_that_stops_short_or_is_absent_falls_back(tmp_path, monkeypatch):
    dirs = make_shards(tmp_path, CONTENTS)
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)  # copies nothing, says so
    assert concatenate_shard_files(dirs, "hyp.scp", tmp_path / "a.scp")
    monkeypatch.delattr(os, "copy_file_range")
    assert concatenate_shard_files(dirs, "hyp.scp", tmp_path / "b.scp")
    assert (tmp_path / "a.scp").read_bytes() == (tmp_path / "b.scp").read_bytes() == JOINED


def test_a_real_write_error_is_raised_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def disk_full(number, args):
        if number == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    count_calls(monkeypatch, fail=disk_full)
    dirs = make_shards(tmp_path, CONTENTS)
    out = tmp_path / "merged" / "hyp.scp"
    out.parent.mkdir()
    out.write_text("old\n")
    with pytest.raises(OSError, match="No space left"):
        concatenate_shard_files(dirs, "hyp.scp", out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["hyp.scp"] and out.read_text() == "old\n"


# ------------------------------------------------------------------ id blocks
def ids_of(data: bytes):
    return [line.split(b" ", 1)[0] for line in data.split(b"\n")[:-1]]


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 7, 11, 64, 1 << 24])
def test_id_blocks_split_anywhere_give_every_line_s_id_once(tmp_path, block_size):
    data = b"a 1\nbb 2 3\n\nccc\n d\nlonger-id-than-a-block x y\n\xc3\xa9 z\nee\r 1\n"
    path = tmp_path / "x.scp"
    path.write_bytes(data)
    blocks = list(iter_id_blocks(path, block_size))
    assert [i for ids in blocks for i in ids] == ids_of(data)
    assert all(blocks), "a block without a line end yields nothing"


@pytest.mark.parametrize("data", [b"a 1\nb", b"a", b"a 1\nb 2\n "])
def test_id_blocks_refuse_a_last_line_without_newline(tmp_path, data):
    path = tmp_path / "x.scp"
    path.write_bytes(data)
    for block_size in (1, 2, 4, 1 << 24):
        with pytest.raises(inference_runner._Suspect):
            list(iter_id_blocks(path, block_size))


# ------------------------------------------------------------------ id check
BLOCK_SIZES = [1, 3, 4, 9, 1 << 24]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(
    "contents, message",
    [
        (["a 1\nb 2\n", "c 3\nb 4\n"], r"^id 'b' appears in both \S*split\.0/hyp\.scp and \S*split\.1/hyp\.scp; ids must be unique$"),
        (["a 1\nb 2\n", "c 3\n", "d 4\na 9\n"], r"^id 'a' appears in both \S*split\.0/hyp\.scp and \S*split\.2/hyp\.scp"),
        (["a 1\nb 2\na 3\n"], r"^id 'a' appears twice in \S*split\.0/hyp\.scp; ids must be unique$"),
        (["x\n", "a 1\nb 2\nb 3\n"], r"^id 'b' appears twice in \S*split\.1/hyp\.scp"),
        (["a 1\n\nb 2\n\n"], r"^id '' appears twice in \S*split\.0/hyp\.scp"),
        (["a 1\n", "b 2\nc 3"], r"^\S*split\.1/hyp\.scp:2: last line has no newline \(torn write\); rerun that shard$"),
        (["a 1\n", None, "b 2\n"], r"^\S*split\.1/hyp\.scp is missing although \S*split\.1/field_keys\.txt lists 'hyp'$"),
        (["a 1\na 2\n", None], r"^id 'a' appears twice"),  # the first problem in shard order is the one named
        (["longid1 x\nlongid2 y\n", "longid1 z\n"], r"^id 'longid1' appears in both"),
        (["é 1\n", "ü 2\né 3\n"], r"^id 'é' appears in both \S*split\.0/hyp\.scp and \S*split\.1/hyp\.scp"),
    ],
)
def test_check_refuses_with_the_exact_message(tmp_path, contents, message, block_size):
    dirs = make_shards(tmp_path, contents)
    with pytest.raises(ContractError, match=message):
        check_unique_ids(dirs, "hyp", block_size=block_size)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize(
    "contents",
    [
        ["a 1\nb 2\n", "c 3\n", "", "d 4\n"],  # sorted and disjoint
        ["c 3\na 1\n", "b 2\nd 4\n"],  # unsorted
        ["a 1\nc 3\n", "b 2\nd 4\n"],  # sorted shards, overlapping ranges
        ["ab 1\na 2\n", "abc\n\n"],  # prefixes, one empty line
    ],
)
def test_check_passes_unique_ids(tmp_path, contents, block_size):
    check_unique_ids(make_shards(tmp_path, contents), "hyp", block_size=block_size)


def test_sorted_disjoint_ids_need_no_set_and_others_do(tmp_path, monkeypatch):
    used = []
    real = inference_runner._ids_unique_by_set
    monkeypatch.setattr(inference_runner, "_ids_unique_by_set", lambda *a: used.append(1) or real(*a))
    check_unique_ids(make_shards(tmp_path / "sorted", ["a 1\nb 2\n", "c 3\nd 4\n"]), "hyp", block_size=4)
    assert used == []
    check_unique_ids(make_shards(tmp_path / "overlap", ["a 1\nc 2\n", "b 3\nd 4\n"]), "hyp")
    assert used == [1]


def test_fast_check_agrees_with_the_exact_pass_on_random_fragments(tmp_path):
    rng = random.Random(0)
    for case in range(150):
        n_ids = rng.randint(1, 12)
        pool = [rng.choice(["", "u", "u1", "u10", "v", "é", "w\r"]) + str(rng.randint(0, 9)) for _ in range(n_ids)]
        contents = []
        for _ in range(rng.randint(1, 4)):
            lines = [f"{rng.choice(pool)} {'x' * rng.randint(0, 3)}" for _ in range(rng.randint(0, 5))]
            if rng.random() < 0.5:
                lines.sort()
            text = "".join(f"{line}\n" for line in lines)
            if rng.random() < 0.05:
                text = text.rstrip("\n")  # torn
            contents.append(text if rng.random() > 0.05 else None)
        dirs = make_shards(tmp_path / str(case), contents)
        try:
            _check_unique_ids_exact(dirs, "hyp")
            expected = None
        except ContractError as exc:
            expected = str(exc)
        for block_size in (1, 2, 5, 1 << 24):
            try:
                check_unique_ids(dirs, "hyp", block_size=block_size)
                got = None
            except ContractError as exc:
                got = str(exc)
            assert got == expected, (contents, block_size)


# ------------------------------------------------------------------ InferenceRunner.merge
def test_merge_writes_every_field_after_the_checks(tmp_path):
    runner = InferenceRunner(provider=None, output_dir=tmp_path / "out", input_key="text")
    dirs = []
    for i, (hyp, score) in enumerate([("a x\nb y\n", "a 1\nb 2\n"), ("c z\n", "c 3\n")]):
        shard_dir = tmp_path / "out" / f"split.{i}"
        shard_dir.mkdir(parents=True)
        (shard_dir / "hyp.scp").write_text(hyp)
        (shard_dir / "score.scp").write_text(score)
        (shard_dir / FIELD_KEYS_NAME).write_text("hyp\nscore\n")
        dirs.append(shard_dir)
    assert runner.merge(dirs) is None  # as ESPnet3's
    assert (tmp_path / "out/hyp.scp").read_text() == "a x\nb y\nc z\n"
    assert (tmp_path / "out/score.scp").read_text() == "a 1\nb 2\nc 3\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hyp.scp", "score.scp", "split.0", "split.1"]


@pytest.mark.parametrize("bad", ["duplicate", "copy-fails"])
def test_failed_merge_leaves_no_merged_or_temp_file(tmp_path, monkeypatch, bad):
    runner = InferenceRunner(provider=None, output_dir=tmp_path / "out", input_key="text")
    dirs = make_shards(tmp_path / "out", ["a 1\n", "b 2\n", "a 3\n" if bad == "duplicate" else "c 3\n"])
    if bad == "copy-fails":

        def disk_full(number, args):
            if number == 2:
                raise OSError(errno.ENOSPC, "No space left on device")

        count_calls(monkeypatch, fail=disk_full)
    with pytest.raises(ContractError if bad == "duplicate" else OSError):
        runner.merge(dirs)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["split.0", "split.1", "split.2"]
