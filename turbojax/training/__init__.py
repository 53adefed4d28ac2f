"""Reusable pieces of the training scripts (train.py today, the distillation engine next), each a small module:

    errors       UserError (one `error:` line, no traceback) and run_cli(main), the entry-point wrapper
    config       parse_args / load_config / apply_overrides / validate / check_workdir: big_vision-style
                 `get_config()` files with `--config.key value` overrides, checked before anything is created
    checkpoints  Checkpoints: Orbax manager for trainables-only state (every K steps, keep N, forced final save,
                 restore_latest with a one-line shape/structure mismatch error)
    guards       check_finite / MetricsBuffer (NaN/Inf stops the run before a bad state is saved) and
                 StopSignal (SIGTERM -> a flag the loop polls, then save and exit 0)
    metrics_log  MetricsLog: metrics.jsonl appends that drop the lines a resumed run will write again

This package itself imports nothing heavy: `config` and `errors` work before JAX is imported, so command-line
mistakes are reported in a fraction of a second.
"""
from turbojax.training.errors import UserError, run_cli  # noqa: F401
