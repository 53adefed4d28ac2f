"""LoRA flow-matching fine-tune of a Qwen-Image transformer (the embedded default runs the tiny model).

    python train.py --config configs/qwen_image_lora.py                      # tiny, random init, synthetic data
    python train.py --config configs/qwen_image_lora.py:real \\
        --config.init_from /path/to/Qwen-Image/transformer --config.total_steps 1000
    python train.py --config.lora.targets='["transformer_blocks\\.attn\\.to_q"]' --config.lora.rank 8

Every number is checked by `turbojax.training.config.validate` before anything runs (counts and sizes >= 1,
rates >= 0, all finite); a field added here that needs its own bound gets a rule there or in the script.
"""
import ml_collections


def get_config(variant: str = "tiny"):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "out/qwen_image_lora"
    # --- model ---
    c.model = "qwen_image_tiny" if variant == "tiny" else "qwen_image"
    c.init_from = ""  # diffusers component folder or turbojax export; empty: random init from `model`
    c.param_dtype = "float32" if variant == "tiny" else "bfloat16"  # frozen base
    c.dtype = "float32" if variant == "tiny" else "bfloat16"  # compute
    c.scan_layers = True
    c.remat = "none" if variant == "tiny" else "dots_no_batch"
    c.attention_impl = "auto"  # chunked on CPU, XLA reference elsewhere
    # --- what trains (regex over our module paths) ---
    c.lora = ml_collections.ConfigDict()
    c.lora.targets = [r"transformer_blocks\.attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
                      r"transformer_blocks\.(img|txt)_mlp\.fc[12]"]
    c.lora.rank = 4 if variant == "tiny" else 64
    c.lora.alpha = 4.0 if variant == "tiny" else 64.0
    # --- data (synthetic latents / text features until the data pipeline lands) ---
    c.batch_size = 4
    c.latent_hw = (8, 8) if variant == "tiny" else (64, 64)  # packed grid h, w (image = 16x that in pixels)
    c.text_len = 8 if variant == "tiny" else 128
    c.num_examples = 64
    # --- optimisation ---
    c.total_steps = 30 if variant == "tiny" else 1000
    c.lr = 1e-3 if variant == "tiny" else 1e-4
    c.warmup_steps = 5 if variant == "tiny" else 100
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.log_every = 10
    c.checkpoint_every = 10 if variant == "tiny" else 200
    c.keep_checkpoints = 2
    # --- mesh (-1 = all remaining devices) ---
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return c
