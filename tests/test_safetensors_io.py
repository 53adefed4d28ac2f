"""Streaming safetensors I/O: byte-identical to the reference writers, strict validation, atomic writes, bounded memory."""
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from turbojax.convert import safetensors_io as sio
from turbojax.convert import safetensors_write as swrite
from turbojax.convert.safetensors_io import (SafetensorsError, atomic_output_dir, format_index_json, open_safetensors,
                                             safetensors_header, write_index_json, write_safetensors, write_sharded)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _mixed(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "w.bf16": rng.standard_normal((4, 2)).astype(BF16),
        "a.f16": rng.standard_normal((7,)).astype(np.float16),
        "b.f64": rng.standard_normal((2, 2)).astype(np.float64),
        "i64": rng.integers(-9, 9, (5,)).astype(np.int64),
        "i32": rng.integers(-9, 9, (1, 3)).astype(np.int32),
        "i16": rng.integers(-9, 9, (3,)).astype(np.int16),
        "i8": rng.integers(-9, 9, (3,)).astype(np.int8),
        "u8": rng.integers(0, 255, (3,)).astype(np.uint8),
        "mask": rng.integers(0, 2, (2, 3)).astype(bool),
        "f8": rng.standard_normal((4,)).astype(ml_dtypes.float8_e4m3fn),
        "f8b": rng.standard_normal((4,)).astype(ml_dtypes.float8_e5m2),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "empty16": np.zeros((2, 0), np.float16),
        "zz.é": np.ones((1,), np.float32),
        'odd"name\n': np.ones((2,), np.int32),
    }


def _bytes(p):
    return Path(p).read_bytes()


# ----------------------------------------------------------------------------------------- byte-identical writer


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"note": "é \n\x01 \"quoted\" /"}])
def test_matches_numpy_save_file(tmp_path, metadata):
    tensors = _mixed()
    np_save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    write_safetensors(tmp_path / "ours.safetensors",
                      [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in tensors.items()], metadata)
    assert _bytes(tmp_path / "ours.safetensors") == _bytes(tmp_path / "ref.safetensors")
    # the mapping shorthand and safetensors_header agree with the full writer
    write_safetensors(tmp_path / "map.safetensors", tensors, metadata)
    assert _bytes(tmp_path / "map.safetensors") == _bytes(tmp_path / "ref.safetensors")
    head = safetensors_header(tensors, metadata)
    assert _bytes(tmp_path / "ref.safetensors").startswith(head) and len(head) % 8 == 0


def test_matches_reference_ordering_for_every_dtype(tmp_path):
    # One tensor per dtype, with names in the opposite order of the dtype ranks, so only the dtype sort can win.
    dtypes = [np.bool_, np.uint8, np.int8, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn, np.int16, np.uint16,
              np.float16, BF16, np.int32, np.uint32, np.float32, np.complex64, np.float64, np.int64, np.uint64]
    dtypes += [getattr(ml_dtypes, n) for n in ("float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(ml_dtypes, n)]
    tensors = {f"t{len(dtypes) - i:02d}": np.ones((3,), d) for i, d in enumerate(dtypes)}
    tensors.update({f"u{k}": v for k, v in tensors.items()})  # ties broken by name
    np_save_file(tensors, tmp_path / "ref.safetensors")
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    assert _bytes(tmp_path / "ours.safetensors") == _bytes(tmp_path / "ref.safetensors")


def test_matches_torch_save_file_and_reads_torch_values(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "transformer.w": torch.randn(6, 4, generator=g, dtype=torch.bfloat16),
        "transformer.b": torch.randn(4, generator=g, dtype=torch.bfloat16),
        "norm.f32": torch.randn(3, 3, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "steps": torch.arange(4, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
        "scale": torch.tensor(0.25, dtype=torch.bfloat16),
        "nothing": torch.zeros(0, 2, dtype=torch.bfloat16),
    }
    ref = tmp_path / "torch.safetensors"
    torch_save_file(tensors, ref, metadata={"format": "pt"})
    r = open_safetensors(ref)
    assert r.keys() == sorted(tensors) and r.metadata == {"format": "pt"}
    for k, t in tensors.items():
        arr = r.get(k)
        assert arr.shape == tuple(t.shape) and r.shape(k) == tuple(t.shape)
        if t.dtype == torch.bfloat16:
            assert arr.dtype == BF16 == r.dtype(k)
            assert np.array_equal(arr.view(np.int16), t.view(torch.int16).numpy())  # bitwise
        else:
            assert np.array_equal(arr, t.numpy()) and arr.dtype == t.numpy().dtype
        assert arr.flags.writeable
        assert r.get(k, mmap=True).tobytes() == arr.tobytes()
    # rewriting from the reader's (memory-mapped) specs reproduces torch's file byte for byte
    out = tmp_path / "ours.safetensors"
    write_safetensors(out, [r.spec(k) for k in r.keys()], metadata=r.metadata)
    assert _bytes(out) == _bytes(ref)


def test_file_order_lazy_producers_and_conversions(tmp_path, monkeypatch):
    monkeypatch.setattr(swrite, "_CHUNK_BYTES", 16)  # force the slab-by-slab path for the non-contiguous inputs
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    calls = []

    def producer(name, value):
        def make():
            calls.append(name)
            return value
        return make

    specs = [("z", (10, 6), np.float32, producer("z", base.T)),  # non-contiguous
             ("y", (6, 10), ">f4", producer("y", base.astype(">f4"))),  # big-endian
             ("x", (), "BF16", producer("x", np.array(2, BF16))),
             ("w", (3,), np.int64, producer("w", np.arange(3)))]
    write_safetensors(tmp_path / "o.safetensors", specs, {"format": "pt"})
    assert calls == ["w", "y", "z", "x"]  # I64 rank > F32 rank > BF16, then by name; each called once
    np_save_file({"z": np.ascontiguousarray(base.T), "y": base.copy(), "x": np.array(2, BF16), "w": np.arange(3)},
                 tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert _bytes(tmp_path / "o.safetensors") == _bytes(tmp_path / "ref.safetensors")


def test_metadata_keeps_file_order_for_exact_roundtrip(tmp_path):
    # The reference writer puts several metadata keys in hash order; a file read back must be rewritten as it was.
    p = tmp_path / "m.safetensors"
    meta = {"zeta": "1", "alpha": "2", "mid": "3"}
    write_safetensors(p, {"a": np.ones(2, np.float32)}, meta)
    r = open_safetensors(p)
    assert list(r.metadata) == list(meta)
    write_safetensors(tmp_path / "again.safetensors", [r.spec("a")], r.metadata)
    assert _bytes(tmp_path / "again.safetensors") == _bytes(p)
    import safetensors  # the reference reader accepts it
    with safetensors.safe_open(p, framework="np") as f:
        assert f.metadata() == meta


# ----------------------------------------------------------------------------------------- sharded diffusers folders


def _tiny_qwen_folder(path):
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=16, in_channels=16, out_channels=4,
                                        axes_dims_rope=(2, 2, 4))
    model.save_pretrained(path, max_shard_size="10KB")
    return model


def test_diffusers_sharded_folder_roundtrip(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = _tiny_qwen_folder(src)
    r = open_safetensors(src)
    state = model.state_dict()
    assert isinstance(r, sio.SafetensorsFolder) and len(r.files) > 2
    assert r.keys() == sorted(state)
    for k in r.keys():
        assert np.array_equal(r.get(k), state[k].numpy()) and r.shape(k) == tuple(state[k].shape)
    index = json.loads((src / sio.DEFAULT_INDEX_NAME).read_text())
    assert r.index_json == index and r.metadata == index["metadata"]
    assert all(r.file_of(k) == f for k, f in index["weight_map"].items())
    assert list(r.layout) == sorted(set(index["weight_map"].values()))

    dst.mkdir()
    written = write_sharded(dst, r.layout, {k: r.spec(k)[1:] for k in r.keys()}, metadata={"format": "pt"})
    names = sorted(p.name for p in written)
    assert names == sorted(p.name for p in src.iterdir() if p.name != "config.json")
    for name in names:
        assert _bytes(dst / name) == _bytes(src / name), name
    # a verbatim index reproduces even a hand-edited one exactly
    odd = r.index_text.replace("\n", "\r\n")
    write_index_json(dst / "verbatim.index.json", odd)
    assert (dst / "verbatim.index.json").read_bytes() == odd.encode()
    assert format_index_json(index["weight_map"], index["metadata"]) == r.index_text
    # a single shard of the folder opens on its own
    one = open_safetensors(src / names[0])
    assert one.metadata == {"format": "pt"} and set(one.keys()) <= set(r.keys())


def test_single_file_folder_and_index_path(tmp_path):
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", {"a": np.ones(3, np.float32)})
    (tmp_path / "config.json").write_text("{}")
    r = open_safetensors(tmp_path)
    assert r.keys() == ["a"] and r.metadata is None and r.index_json is None
    assert r.layout == {"diffusion_pytorch_model.safetensors": ["a"]}
    assert r.file_of("a") == "diffusion_pytorch_model.safetensors"
    with pytest.raises(KeyError, match="'nope'.*" + str(tmp_path.name)):
        r.get("nope")
    with pytest.raises(KeyError, match="'nope'.*diffusion_pytorch_model.safetensors"):
        r.files["diffusion_pytorch_model.safetensors"].shape("nope")


# ----------------------------------------------------------------------------------------- validation errors


def _raw(path, header, data=b"", pad=True):
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _expect(path, *fragments):
    with pytest.raises(SafetensorsError) as e:
        open_safetensors(path)
    msg = str(e.value)
    for frag in (Path(path).name, *fragments):
        assert frag in msg, msg
    return msg


def test_error_truncated_file(tmp_path):
    p = tmp_path / "cut.safetensors"
    write_safetensors(p, {"big": np.ones((8, 8), np.float32), "small": np.ones(2, np.float16)})
    p.write_bytes(_bytes(p)[:-3])
    _expect(p, "'small'", "truncated")


def test_error_short_and_oversized_header(tmp_path):
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    _expect(tiny, "shorter than")
    big = tmp_path / "big.safetensors"
    big.write_bytes(struct.pack("<Q", 1000) + b"{}")
    _expect(big, "header length 1000 exceeds")


def test_error_bad_header_json(tmp_path):
    _expect(_raw(tmp_path / "json.safetensors", b'{"a": {"dtype": "F32",,}}'), "not valid UTF-8 JSON")
    _expect(_raw(tmp_path / "utf8.safetensors", b'{"\xff": 1}'), "not valid UTF-8 JSON")
    _expect(_raw(tmp_path / "list.safetensors", b"[1, 2]"), "does not start with")
    _expect(_raw(tmp_path / "dup.safetensors", b'{"a": {}, "a": {}}'), "duplicate key 'a'")
    _expect(_raw(tmp_path / "meta.safetensors", {"__metadata__": {"n": 1}}), "__metadata__")
    # corrupting a byte of a real file's header
    p = tmp_path / "real.safetensors"
    write_safetensors(p, {"a": np.ones(3, np.float32)})
    raw = bytearray(_bytes(p))
    raw[raw.index(b":")] = ord(";")
    p.write_bytes(bytes(raw))
    _expect(p, "not valid UTF-8 JSON")


def test_error_entry_fields(tmp_path):
    _expect(_raw(tmp_path / "dtype.safetensors", {"w": _entry("Q32", [1], 0, 4)}, b"\0" * 4), "'w'", "'Q32'")
    _expect(_raw(tmp_path / "size.safetensors", {"w": _entry("F32", [2], 0, 4)}, b"\0" * 4), "'w'", "needs 8")
    _expect(_raw(tmp_path / "shape.safetensors", {"w": _entry("F32", [-1], 0, 4)}, b"\0" * 4), "'w'", "shape")
    _expect(_raw(tmp_path / "offs.safetensors", {"w": _entry("F32", [1], 4, 0)}, b"\0" * 4), "'w'", "data_offsets")
    _expect(_raw(tmp_path / "missing.safetensors", {"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "'w'",
            "data_offsets")


def test_error_offsets_layout(tmp_path):
    two = {"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 2, 6)}
    _expect(_raw(tmp_path / "overlap.safetensors", two, b"\0" * 6), "overlaps")
    gap = {"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}
    _expect(_raw(tmp_path / "gap.safetensors", gap, b"\0" * 12), "'b'", "belong to no tensor")
    one = {"a": _entry("F32", [1], 0, 4)}
    _expect(_raw(tmp_path / "trail.safetensors", one, b"\0" * 9), "5 trailing bytes")
    _expect(_raw(tmp_path / "past.safetensors", {"a": _entry("F32", [2], 0, 8)}, b"\0" * 4), "'a'", "truncated")
    # zero-size tensors may share an offset with their neighbour, as the reference writer produces
    ok = {"a": _entry("F32", [1], 0, 4), "e": _entry("F32", [0], 4, 4), "f": _entry("F16", [0, 2], 4, 4)}
    r = open_safetensors(_raw(tmp_path / "ok.safetensors", ok, b"\0" * 4))
    assert r.get("e").shape == (0,) and r.get("f", mmap=True).shape == (0, 2)


def _sharded(folder):
    folder.mkdir()
    write_safetensors(folder / "m-1.safetensors", {"a": np.ones(2, np.float32)})
    write_safetensors(folder / "m-2.safetensors", {"b": np.ones(2, np.float32)})
    index = {"metadata": {"total_size": 16}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    write_index_json(folder / "m.safetensors.index.json", index)
    return index


def test_error_index_problems(tmp_path):
    ok = tmp_path / "ok"
    _sharded(ok)
    assert open_safetensors(ok).layout == {"m-1.safetensors": ["a"], "m-2.safetensors": ["b"]}
    assert open_safetensors(ok / "m.safetensors.index.json").keys() == ["a", "b"]

    def broken(name, edit):
        folder = tmp_path / name
        index = _sharded(folder)
        edit(folder, index)
        return folder

    def set_index(folder, index):
        write_index_json(folder / "m.safetensors.index.json", index)

    f = broken("missing_shard", lambda d, i: set_index(d, {**i, "weight_map": {**i["weight_map"],
                                                                               "c": "m-3.safetensors"}}))
    with pytest.raises(SafetensorsError, match=r"m.safetensors.index.json.*'m-3.safetensors'.*'c'"):
        open_safetensors(f)
    f = broken("missing_key", lambda d, i: set_index(d, {**i, "weight_map": {**i["weight_map"],
                                                                             "c": "m-2.safetensors"}}))
    with pytest.raises(SafetensorsError, match=r"'c'.*'m-2.safetensors'"):
        open_safetensors(f)
    f = broken("extra_key", lambda d, i: write_safetensors(d / "m-2.safetensors", {"b": np.ones(2, np.float32),
                                                                                    "x": np.ones(1, np.int8)}))
    with pytest.raises(SafetensorsError, match=r"m-2.safetensors.*'x'.*does not list"):
        open_safetensors(f)
    f = broken("two_indexes", lambda d, i: write_index_json(d / "n.safetensors.index.json", i))
    with pytest.raises(SafetensorsError, match=r"several shard indexes.*m.safetensors.index.json"):
        open_safetensors(f)
    f = broken("bad_json", lambda d, i: (d / "m.safetensors.index.json").write_text("{oops"))
    with pytest.raises(SafetensorsError, match="m.safetensors.index.json"):
        open_safetensors(f)
    f = broken("escape", lambda d, i: set_index(d, {"weight_map": {"a": "../m-1.safetensors"}}))
    with pytest.raises(SafetensorsError, match="file name in the same folder"):
        open_safetensors(f)
    f = broken("no_index", lambda d, i: (d / "m.safetensors.index.json").unlink())
    with pytest.raises(SafetensorsError, match=r"several .safetensors files.*m-1.safetensors.*m-2.safetensors"):
        open_safetensors(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafetensorsError, match="no .safetensors file"):
        open_safetensors(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        open_safetensors(tmp_path / "absent")


# ----------------------------------------------------------------------------------------- writer errors, atomicity


def test_writer_rejects_mismatches_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")

    def boom():
        raise RuntimeError("producer failed")

    cases = [
        ([("a", (2,), np.float32, lambda: np.ones(3, np.float32))], SafetensorsError, "'a'.*shape"),
        ([("a", (2,), np.float32, lambda: np.ones(2, np.float64))], SafetensorsError, "'a'.*dtype"),
        ([("a", (2,), np.float32, lambda: np.ones(2, np.float32)), ("b", (1,), np.int8, boom)], RuntimeError,
         "producer failed"),
        ([("a", (2,), "complex256", lambda: None)], SafetensorsError, "'a'.*unsupported dtype"),
        ([("a", (1,), np.int8, boom), ("a", (1,), np.int8, boom)], SafetensorsError, "'a' is given twice"),
    ]
    for tensors, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            write_safetensors(target, tensors)
        assert sorted(os.listdir(tmp_path)) == ["out.safetensors"] and _bytes(target) == b"previous"
    with pytest.raises(SafetensorsError, match="metadata"):
        write_safetensors(tmp_path / "m.safetensors", {"a": np.ones(1)}, {"n": 1})
    with pytest.raises(SafetensorsError, match="'b' is in no file"):
        write_sharded(tmp_path, {"x.safetensors": ["a"]}, {"a": np.ones(1), "b": np.ones(1)})


def test_atomic_output_dir(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dst) as tmp:
            write_safetensors(tmp / "a.safetensors", {"a": np.ones(2)})
            raise RuntimeError("half way")
    assert list(tmp_path.iterdir()) == []

    with atomic_output_dir(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "v1").write_text("1")
    assert sorted(os.listdir(dst)) == ["v1"] and len(list(tmp_path.iterdir())) == 1

    with pytest.raises(FileExistsError, match=str(dst)):
        with atomic_output_dir(dst):
            pass
    with pytest.raises(ValueError):
        with atomic_output_dir(dst, overwrite=True) as tmp:
            (tmp / "v2").write_text("2")
            assert sorted(os.listdir(dst)) == ["v1"]  # old one intact while the new one is written
            raise ValueError
    assert sorted(os.listdir(dst)) == ["v1"]
    with atomic_output_dir(dst, overwrite=True) as tmp:
        (tmp / "v2").write_text("2")
    assert sorted(os.listdir(dst)) == ["v2"] and len(list(tmp_path.iterdir())) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:
        (tmp / "x").write_text("x")
    assert os.listdir(empty) == ["x"]


def test_progress_bar_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOJAX_PROGRESS", "1")
    write_safetensors(tmp_path / "p.safetensors", {"a": np.ones(4)}, progress=True)
    assert swrite._progress_enabled(True)
    monkeypatch.setenv("TURBOJAX_NO_PROGRESS", "1")
    assert not swrite._progress_enabled(True)


# ----------------------------------------------------------------------------------------- memory


_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from turbojax.convert.safetensors_io import open_safetensors, write_safetensors

    def peak_mb():
        # VmHWM, not getrusage's ru_maxrss: the latter survives exec and would report the forking pytest's peak.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

    n, mb = 4, 50
    shape = (mb * 1024 * 1024 // 4,)
    base = peak_mb()
    write_safetensors(sys.argv[1], [(f"t{i}", shape, np.float32, (lambda i=i: np.full(shape, i, np.float32)))
                                    for i in range(n)])
    written = peak_mb()
    r = open_safetensors(sys.argv[1])
    for k in r.keys():
        a = r.get(k)
        assert a[0] == a[-1] == int(k[1:])
        del a
    print(base, written, peak_mb())
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_is_one_tensor(tmp_path):
    out = tmp_path / "big.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(out)], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    base, written, read = map(float, res.stdout.split())
    assert out.stat().st_size > 200 * 1024 * 1024
    # 200 MB file, 50 MB tensors: the writer and the reader each hold one tensor at a time (two would be 100 MB).
    assert written - base < 80, (base, written)
    assert read - base < 80, (base, read)
