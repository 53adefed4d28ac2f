"""Random access to the records of complete caches (memory-mapped safetensors shards; nothing is loaded whole).

`TextRecords` is a sequence of prompt embeddings `[L_i, D]` (grain's `MapDataset.source` takes it as is);
`LatentRecords` a sequence of latents in the transformer's layout with the prompt each belongs to.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from turbojax.cache import store

HINT = "build it with `python -m turbojax.cache` (or let train.py build it)"


class _Rows:
    """Variable-length rows of `emb` in a table: record r -> (shard, start, length)."""

    def __init__(self, folder: Path, table: str, shards: int):
        self.t = store.Table(folder, table, shards)
        self.lengths = self.t.column("len").astype(np.int64)
        per = np.asarray([len(f.get_tensor("len")) for f in self.t.files], np.int64)
        self.shard = np.repeat(np.arange(len(per)), per)
        starts = np.concatenate([[0], np.cumsum(per)[:-1]])
        self.start = np.zeros(len(self.lengths), np.int64)
        for s, (a, n) in enumerate(zip(starts, per)):
            self.start[a:a + n] = np.concatenate([[0], np.cumsum(self.lengths[a:a + n])[:-1]])

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, r: int) -> np.ndarray:
        r = int(r)
        a = int(self.start[r])
        return self.t.slice(int(self.shard[r]), "emb", a, a + int(self.lengths[r]))


class TextRecords:
    def __init__(self, folder):
        self.folder = Path(folder)
        man = store.open_complete(self.folder, "text", HINT)
        self.family = man["fields"]["family"]
        self.prompts = _Rows(self.folder, "prompt", man["tables"]["prompt"])
        self.negatives = _Rows(self.folder, "negative", man["tables"]["negative"])
        self.neg = self.prompts.t.column("neg").astype(np.int64)
        self.dim = int(self.prompts[0].shape[-1])

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def __len__(self):
        return self.num_prompts

    def __getitem__(self, p):
        return self.prompt(p)

    def prompt(self, p: int) -> np.ndarray:
        return self.prompts[p]

    def negative_of(self, p: int) -> np.ndarray:
        return self.negatives[int(self.neg[int(p)])]


class LatentRecords:
    def __init__(self, folder, kind: str, table: str):
        self.folder = Path(folder)
        man = store.open_complete(self.folder, kind, HINT)
        self.manifest = man
        self.t = store.Table(self.folder, table, man["tables"][table])
        self.prompt = self.t.column("prompt").astype(np.int64)
        per = self.t.rows_per_shard("latent")
        self.shard = np.repeat(np.arange(len(per)), per)
        self.local = np.concatenate([np.arange(n) for n in per]) if len(per) else np.zeros(0, np.int64)

    def __len__(self):
        return len(self.prompt)

    def __getitem__(self, r: int) -> np.ndarray:
        r = int(r)
        j = int(self.local[r])
        return self.t.slice(int(self.shard[r]), "latent", j, j + 1)[0]
