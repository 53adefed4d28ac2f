"""TFDS prompt sources: a tiny custom builder prepared as array_record into tmp_path, read back through
`tfds.data_source` (no TensorFlow, never the network)."""
import hashlib
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from turbojax.data.prompts import PromptFileError, prompts_fingerprint, read_config_prompts, read_prompts  # noqa


def _prepare(data_dir, splits, *, name="tiny_prompts", key="prompt", dtype=None, version="1.0.0"):
    """Prepare `splits` ({split: [values]}) as dataset `name` with one feature `key` (Text, or Tensor(dtype)) and an
    int index, in array_record. Unregistered: the reader must find it through the data_dir alone, as in a fresh
    process that never saw the builder class."""
    feature = tfds.features.Text() if dtype is None else tfds.features.Tensor(shape=(), dtype=dtype)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {key: feature, "idx": tfds.features.Tensor(shape=(), dtype=np.int32)}))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(v) for s, v in splits.items()}

    def _generate_examples(self, values):
        for i, v in enumerate(values):
            yield i, {key: v, "idx": i}

    cls = type(f"Builder_{name}_{time.monotonic_ns()}", (tfds.core.GeneratorBasedBuilder,),
               {"name": name, "VERSION": tfds.core.Version(version), "_info": _info,
                "_split_generators": _split_generators, "_generate_examples": _generate_examples,
                "__module__": __name__}, skip_registration=True)  # several tests reuse a name
    cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def _data(prompts, tfds_dir, tfds_key=""):
    return ml_collections.ConfigDict(dict(prompts=prompts, tfds_dir=str(tfds_dir), tfds_key=tfds_key))


def test_reads_prompts_blank_and_duplicates(tmp_path):
    d = _prepare(tmp_path / "tfds", {"train": ["a red fox", "  ", "a blue whale", "a red fox", "  a cat  "],
                                     "test": ["held out"]})
    p = read_config_prompts(_data("tfds:tiny_prompts", d))
    # tfds stores records in its own (hashed-key) order: compare as sets, and the counts exactly
    assert sorted(p.prompts) == ["a blue whale", "a cat", "a red fox"]
    assert all(isinstance(s, str) for s in p.prompts)
    assert (p.skipped_blank, p.skipped_duplicate) == (1, 1)
    assert p.negatives == [None] * 3 and p.images == ()
    assert read_prompts("tfds:tiny_prompts:test", tfds_dir=d).prompts == ["held out"]
    assert read_prompts("tfds:tiny_prompts:1.0.0:test", tfds_dir=d).prompts == ["held out"]
    assert len(read_prompts("tfds:tiny_prompts:train[:2]", tfds_dir=d).prompts) <= 2


def test_caption_key_and_tensor_feature(tmp_path):
    d = _prepare(tmp_path / "tfds", {"train": ["one", "two"]}, name="caps", key="caption", dtype=np.str_)
    assert sorted(read_prompts("tfds:caps", tfds_dir=d).prompts) == ["one", "two"]  # default key falls to caption
    with pytest.raises(PromptFileError, match=r"tfds_key 'text' is not a feature.*caption"):
        read_prompts("tfds:caps", tfds_dir=d, tfds_key="text")


def test_bad_records_name_split_and_index(tmp_path):
    d = _prepare(tmp_path / "tfds", {"train": [1, 2, 3]}, name="numbers", dtype=np.int32)
    with pytest.raises(PromptFileError, match=r"tfds:numbers: split train record \d: 'prompt' is not text \(int32\)"):
        read_prompts("tfds:numbers", tfds_dir=d)
    d2 = _prepare(tmp_path / "tfds2", {"train": ["", " "]}, name="blanks")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        read_prompts("tfds:blanks", tfds_dir=d2)
    with pytest.raises(PromptFileError, match="Unknown split 'validation'"):
        read_prompts("tfds:blanks:validation", tfds_dir=d2)


def test_missing_dataset_is_one_error_line_fast(tmp_path):
    (tmp_path / "empty").mkdir()
    t = time.monotonic()
    for spec, data_dir in (("tfds:mnist", tmp_path / "empty"), ("tfds:nope:train", tmp_path / "absent"),
                           ("tfds:tiny_prompts:2.0.0", tmp_path / "empty")):
        with pytest.raises(PromptFileError) as e:
            read_prompts(spec, tfds_dir=data_dir)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(spec) and "not prepared" in msg and "nothing is downloaded" in msg
    with pytest.raises(PromptFileError, match="set --config.data.tfds_dir"):
        read_prompts("tfds:mnist")
    assert time.monotonic() - t < 5  # a real download attempt hangs for minutes


def test_cli_missing_dataset_one_error_line(tmp_path):
    """Through the cache command line: one `error:` line, non-zero exit, well before any download timeout."""
    code = ("import sys; from turbojax.training import run_cli, UserError\n"
            "from turbojax.data.prompts import PromptFileError, read_config_prompts\n"
            "import ml_collections as mc\n"
            "def main(argv):\n"
            "    cfg = mc.ConfigDict(dict(data=dict(prompts='tfds:mnist', tfds_dir=sys.argv[1], tfds_key='')))\n"
            "    try:\n        read_config_prompts(cfg.data)\n"
            "    except PromptFileError as e:\n        raise UserError(f'--config.data.prompts {e}') from None\n"
            "sys.exit(run_cli(main))\n")
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t < 5 + 10  # interpreter + jax-free imports; the download hang is ~200 s
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() + r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --config.data.prompts tfds:mnist: dataset mnist is not "
                                                   "prepared"), r.stderr


def test_cache_key_follows_the_dataset(tmp_path):
    d1 = _prepare(tmp_path / "a", {"train": ["a red fox", "a cat"]})
    d2 = _prepare(tmp_path / "b", {"train": ["a red fox", "a dog"]})  # same name, version and count
    d3 = _prepare(tmp_path / "c", {"train": ["a red fox", "a cat"]}, version="1.0.1")
    k1, k1b = prompts_fingerprint(_data("tfds:tiny_prompts", d1)), prompts_fingerprint(_data("tfds:tiny_prompts", d1))
    k2 = prompts_fingerprint(_data("tfds:tiny_prompts", d2))
    k3 = prompts_fingerprint(_data("tfds:tiny_prompts", d3))
    k_test = prompts_fingerprint(_data("tfds:tiny_prompts:train[:1]", d1))
    assert k1 == k1b and "tiny_prompts" in k1 and "1.0.0" in k1 and "2 records" in k1
    assert len({k1, k2, k3, k_test}) == 4
    # a text file's key is unchanged (its sha256), so existing caches stay valid
    f = tmp_path / "p.txt"
    f.write_text("x\n")
    assert prompts_fingerprint(_data(str(f), "")) == hashlib.sha256(b"x\n").hexdigest()


@pytest.mark.slow
def test_text_cache_from_a_tfds_source(tmp_path):
    """The cache builder end to end on the tiny Qwen-Image pipeline: prompts from TFDS, and a re-prepared dataset
    (same name, version and count, other prompts) builds a new text cache instead of reusing the old one."""
    from test_cache import _cfg, _loader_of
    from turbojax.cache import build
    from turbojax.cache.records import TextRecords
    from turbojax.pipelines import from_diffusers
    from test_pipeline_e2e import qwen_pipeline_torch
    folder = tmp_path / "Qwen-Image-tiny"
    qwen_pipeline_torch().save_pretrained(folder)
    load, calls = _loader_of(from_diffusers(folder, progress=False))
    d = tmp_path / "tfds"
    _prepare(d, {"train": ["a red fox", "", "cat", "a red fox"]})
    cfg = _cfg(folder, "tfds:tiny_prompts", tfds_dir=str(d))
    out = build.ensure(cfg, tmp_path / "c", ("text",), load_pipe=load, progress=lambda m: None)
    assert TextRecords(out["text"]).num_prompts == 2
    assert build.ensure(cfg, tmp_path / "c", ("text",), load_pipe=load)["text"] == out["text"] and len(calls) == 1
    shutil.rmtree(d)
    _prepare(d, {"train": ["a blue whale", "", "dog", "a blue whale"]})
    out2 = build.ensure(cfg, tmp_path / "c", ("text",), load_pipe=load, progress=lambda m: None)
    assert out2["text"] != out["text"] and len(calls) == 2
