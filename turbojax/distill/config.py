"""Default distillation config (an `ml_collections.ConfigDict`); the files in `configs/` start from it and set the
policy for one model (what trains, at which rank and learning rate, the student's sigma list, CFG, GAN).

Every field, with the published values it follows (shared docs `distillation.md` §1, §9):

  method            "dmd2" (DMD2; with GAN when gan.weight > 0)
  model / init_from preset name for a random base, or a diffusers folder / turbojax export of the teacher
  student.sigmas    the student's sigma list without the final 0; 2 steps: (1.0, 0.75) = raw (1, 0.5) under shift 3.
                    4 or 8 steps: a longer list, e.g. (1.0, 0.9, 0.75, 0.5). Training and inference use the same list.
  student.shift     the shift the list was made with (written beside the exported LoRA for samplers)
  student.rollout   "euler" (the inference sampler's update, default) or "renoise" (DMD2's re-noising)
  lora.student/fake targets (regexes over our module paths), rank, alpha
  init_student_lora a LoRA file that warm-starts the student (a PCM LoRA in the Wuli recipe)
  dmd.real_cfg      CFG of the real score (teacher); 1 for guidance-distilled teachers (Z-Image-Turbo: CFG 0/1)
  dmd.time, time_shift   the DMD noising time: tau ~ U[lo, hi] then shifted
  fake.time, time_shift  the fake score's flow-matching time
  gan.weight        generator GAN weight (0 = no GAN); FastGen / Model-Optimizer use 0.03
  gan.d_weight      discriminator loss weight in the critic turn
  gan.features      "teacher" (frozen teacher features, one teacher pass for DMD target + D), "fake" (DMD2 paper),
                    or "dino" (dmd2 / turbopp: heads on a frozen DINOv2's tokens of VAE-decoded clean samples and
                    reals, the ADD / Wuli choice; `turbojax/distill/dino_disc.py`). With "dino":
  gan.dino          a DINOv2 folder (transformers Dinov2Model / Dinov2WithRegistersModel, or its turbojax export),
                    loaded frozen in `dtype`; the teacher's VAE decoder (fp32) is loaded from init_from beside it
  gan.dino_layers   DINO blocks the heads read: integers are 0-based indices, floats fractions of depth in (0, 1];
                    () = (0.25, 0.5, 0.75, 1.0), blocks 2, 5, 8, 11 of a 12-block ViT (StyleGAN-T / ADD)
  gan.dino_size     DINO input resolution (decoded images are resized to it), a multiple of the patch size (224)
  gan.dino_cond     heads projected onto the mean prompt embedding (ADD's text conditioning); False: unconditional
  gan.hidden        width of the discriminator heads (feature and DINO heads)
  gan.depths        feature taps as fractions of depth (FastGen: 0.5, 0.75, 0.99)
  gan.r1_weight     R1 penalty on the heads' inputs (Model-Optimizer: 0.1)
  gan.real_mix      fraction of D's reals drawn from real-image latents; the rest are teacher samples (Wuli mix)
  data.kind         "digits" (the embedded demo) or "prompts": data.prompts (.txt / .jsonl / tfds:) encoded at start-up
                    by the pipeline's text encoder, data.negative_prompt for the teacher's CFG, data.width/height,
                    data.teacher_samples generated with data.teacher_steps as the discriminator's reals; or "cache":
                    the same inputs read from on-disk caches (`turbojax.cache`, built first when missing)
  data.tfds_dir     data.prompts = "tfds:NAME[:VERSION][:SPLIT]" reads a TFDS dataset prepared (array_record) in
                    this local folder through tfds.data_source, no TensorFlow, never a download
  data.tfds_key     its text feature (default: "prompt", else "caption")
  data.cache_dir    where the caches live (default: <workdir>/cache); keyed sub-folders, so runs can share one
  data.images       a folder of real images (PNG/JPEG/WebP, recursive) for the latents cache (gan.real_mix > 0);
                    JSONL prompt records may also name an `image`
  data.latent_mode  "mean" (the VAE posterior mean) or "sample" (seeded by `seed`, per image)
  data.cache_shard_size  records per shard; data.encode_batch  batch of the text encoder / VAE / teacher sampler
  data.cache_bucket Qwen-Image text buckets (lengths rounded up to this); Z-Image batches use exact lengths
  data.buckets      aspect-ratio buckets, "WxH,WxH,..." (multiples of 16; data.kind "cache"; "" = off): each real
                    image is cropped to the bucket nearest its aspect ratio, teacher samples split over the buckets,
                    and every batch trains at one bucket's resolution, drawn by its share of the reals
                    (`turbojax/data/buckets.py`); the first bucket replaces data.width x data.height
  ttur_ratio        critic turns per generator turn (FastGen: 5)
  ema_decay         EMA of the student LoRA (exported); 0 = no EMA
  opt.<group>.lr    per group: student, fake, disc; opt.warmup_steps, weight_decay, b1, b2, grad_clip
  opt.schedule      the LR after the warm-up: "constant", or "cosine" / "linear" decay to 0 at the run's end
                    (each group over its own updates: the generator's are total_steps / ttur_ratio), or "wsd":
                    constant, then linear decay to 0 over the run's last opt.decay_steps steps (> 0; a run
                    shorter than that decays all along)
  mesh              (data, fsdp, tensor) sizes over all devices of all hosts; -1 fills; laid out along the TPU
                    torus, and on a multi-slice job data spans the slices (a multiple of their number)
  distributed       multi-host runs (`turbojax.distributed`): coordinator_address, num_processes, process_id,
                    local_device_ids, or auto (Cloud TPU / SLURM detection); timeout_s. Default: one process
"""
from __future__ import annotations

import ml_collections

from turbojax.training.config import distributed_config


def dmd2_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "dmd2"
    c.seed = 0
    c.workdir = "out/dmd2"
    c.model = ""
    c.init_from = ""
    c.param_dtype = "float32"
    c.dtype = "float32"
    c.scan_layers = True
    c.remat = "none"
    c.attention_impl = "auto"

    c.student = ml_collections.ConfigDict(dict(sigmas=(1.0, 0.75), shift=3.0, rollout="euler", cfg=1.0))
    lora_targets = [r"transformer_blocks\.attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
                    r"transformer_blocks\.(img|txt)_mlp\.fc[12]"]
    c.lora = ml_collections.ConfigDict()
    c.lora.student = ml_collections.ConfigDict(dict(targets=list(lora_targets), rank=64, alpha=64.0))
    c.lora.fake = ml_collections.ConfigDict(dict(targets=list(lora_targets), rank=64, alpha=64.0))
    c.init_student_lora = ""

    c.dmd = ml_collections.ConfigDict(dict(real_cfg=4.0, cfg_rescale=True, weight=1.0, time=(0.02, 0.98),
                                           time_shift=3.0))
    c.fake = ml_collections.ConfigDict(dict(time=(0.0, 1.0), time_shift=3.0))
    c.gan = ml_collections.ConfigDict(dict(weight=0.03, d_weight=1.0, features="teacher", depths=(0.5, 0.75, 0.99),
                                           hidden=256, r1_weight=0.0, time=(0.02, 0.98), time_shift=3.0,
                                           real_mix=0.0, dino="", dino_layers=(), dino_size=224, dino_cond=True))
    c.ttur_ratio = 5
    c.ema_decay = 0.99

    c.opt = ml_collections.ConfigDict(dict(warmup_steps=0, weight_decay=0.01, b1=0.9, b2=0.999, grad_clip=10.0,
                                           schedule="constant", decay_steps=0))
    for g, lr in (("student", 1e-5), ("fake", 1e-5), ("disc", 1e-5)):
        c.opt[g] = ml_collections.ConfigDict(dict(lr=lr))

    # where batches come from: "digits" (the embedded demo) or "prompts" (a text / JSONL file of prompts encoded at
    # start-up by the pipeline's text encoder; D's reals are then teacher samples generated at start-up)
    c.data = ml_collections.ConfigDict(dict(kind="prompts", prompts="", negative_prompt=" ", max_sequence_length=512,
                                            teacher_samples=64, teacher_samples_per_class=16, teacher_steps=50,
                                            width=1024, height=1024, cache_dir="", images="", latent_mode="mean",
                                            cache_shard_size=1024, encode_batch=16, cache_bucket=64, buckets="",
                                            tfds_dir="", tfds_key=""))
    c.batch_size = 4
    c.total_steps = 5000
    c.log_every = 10
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.sample_every = 500  # sample grid (fixed prompts and noise) into TensorBoard and workdir/samples/
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = distributed_config()
    return c
