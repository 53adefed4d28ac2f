"""The real-model path of train.py: a local diffusers pipeline folder, a prompt file encoded at start-up by the
pipeline's text encoder, DMD2 + GAN with teacher samples as the discriminator's reals (tiny Qwen-Image and Z-Image)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline_e2e import qwen_pipeline_torch, z_image_pipeline_torch
from turbojax.data.prompts import PromptFileError, read_prompts

REPO = Path(__file__).resolve().parent.parent


def test_prompt_files(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \na cat\n")
    p = read_prompts(f)
    assert p.prompts == ["a cat", "a dog"] and p.skipped_blank == 1 and p.skipped_duplicate == 1
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "a fox", "negative_prompt": "blurry"}) + "\n\n" + json.dumps({"prompt": "x"})
                 + "\n")
    p = read_prompts(j)
    assert p.prompts == ["a fox", "x"] and p.negatives == ["blurry", None]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{not json\n")
    with pytest.raises(PromptFileError, match=r"bad.jsonl:2: not a JSON object"):
        read_prompts(bad)
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(PromptFileError, match=r"bad.jsonl:1: .*\"prompt\""):
        read_prompts(bad)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(PromptFileError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def _run(config, folder, prompts, workdir, *extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [sys.executable, str(REPO / "train.py"), "--config", config, "--workdir", str(workdir),
            "--config.init_from", str(folder), "--config.data.prompts", str(prompts),
            "--config.param_dtype", "float32", "--config.dtype", "float32", "--config.remat", "none",
            "--config.data.width", "64", "--config.data.height", "64", "--config.data.teacher_samples", "2",
            "--config.data.teacher_steps", "2", "--config.data.max_sequence_length", "32",
            "--config.total_steps", "2", "--config.ttur_ratio", "1", "--config.batch_size", "2",
            "--config.lora.student.rank", "2", "--config.lora.fake.rank", "2", "--config.gan.hidden", "8",
            "--config.checkpoint_every", "2", "--config.log_every", "1", "--config.sample_every", "0", *extra]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen_image", "z_image"])
def test_train_py_distils_a_pipeline_from_a_prompt_file(tmp_path, family):
    folder = tmp_path / "pipe"
    (qwen_pipeline_torch() if family == "qwen_image" else z_image_pipeline_torch()).save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ["a red fox in the snow", "a lighthouse at dusk", "a red fox in the snow"]) + "\n")
    config = "configs/qwen_image_dmd2_gan.py" if family == "qwen_image" else "configs/z_image_dmd2_gan.py"
    r = _run(config, folder, prompts, tmp_path / "w")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 prompts from" in r.stdout and "1 repeated" in r.stdout
    for name in ("lora.safetensors", "lora_comfy.safetensors", "sampler.json"):
        assert (tmp_path / "w" / name).is_file(), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # the exported LoRA loads back into our pipeline as a LoRA of this family
    from turbojax import pipelines
    pipe = pipelines.from_diffusers(folder, loras=[(tmp_path / "w" / "lora.safetensors", 1.0)], progress=False)
    assert pipe.family == family
    # a bad prompt file is one error line, nothing trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    r = _run(config, folder, bad, tmp_path / "w2")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: --config.data.prompts")
