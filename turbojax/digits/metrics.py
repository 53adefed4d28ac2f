"""Quality metrics of generated digits, on the features of a small CNN classifier trained on the held-out split.

The classifier (`Classifier`, Flax NNX used functionally) sees only the 1,000 held-out digits (`data.load_digits(
"heldout")`), never the 4,000 train digits that the teacher learned from and that serve as the reference, so its
features are not fitted to the reference set. Its weights are shipped (`assets/classifier.npz`, trained by
`train_classifier` with a fixed seed in ~20 s) so that every machine measures with the same network.

Metrics (`evaluate(images, labels)`; features = the classifier's 128-d penultimate layer):
  * `fd`: Frechet distance between the Gaussians fitted to the generated and to the 4,000 real train digits'
    features (the FID formula on our features). It is biased upwards by a finite sample: compare rows with the same
    number of images (the bench uses 1,000 per seed);
  * `accuracy`: fraction of images the classifier assigns to the class they were asked for;
  * `diversity`: per class, the mean pairwise feature distance among generated images divided by the same among
    the real train digits of that class; averaged over classes (1 = as varied as the data, < 1 = mode collapse);
  * `recall` / `precision`: per class, k-NN manifold recall / precision (Kynkaenniemi et al. 2019, k = 3):
    recall = fraction of real digits of the class lying within the k-NN radius (distance to the k-th nearest other
    generated image) of some generated image of that class; precision = the converse with real radii; averaged
    over classes.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from turbojax.digits import data

CLASSIFIER_FILE = Path(__file__).resolve().parent / "assets" / "classifier.npz"
FEATURES = 128
KNN_K = 3


class Classifier(nnx.Module):
    """conv3x3(32) -> pool -> conv3x3(64) -> pool -> conv3x3(64) -> pool -> flatten 4x4x64 -> dense 128 (features)
    -> 10 (ReLU after each but the last)."""

    def __init__(self, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.c3 = nnx.Conv(64, 64, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 64, FEATURES, rngs=rngs)
        self.head = nnx.Linear(FEATURES, data.NUM_CLASSES, rngs=rngs)

    def features(self, x):
        """x: float [N, 32, 32, 1] in [-1, 1] -> [N, 128]."""
        pool = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
        h = pool(jax.nn.relu(self.c1(x)))
        h = pool(jax.nn.relu(self.c2(h)))
        h = pool(jax.nn.relu(self.c3(h)))
        return jax.nn.relu(self.fc(h.reshape(h.shape[0], -1)))

    def __call__(self, x):
        return self.head(self.features(x))


def _shift(x, rng: np.random.Generator, max_shift: int = 2):
    """Random translations by up to `max_shift` pixels (zero background = -1 fill): the only augmentation."""
    out = np.full_like(x, -1.0)
    pad = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, x.shape[0]))
    for i in range(x.shape[0]):
        out[i] = pad[i, dy[i]:dy[i] + x.shape[1], dx[i]:dx[i] + x.shape[2]]
    return out


def train_classifier(seed: int = 0, epochs: int = 40, batch: int = 50, lr: float = 2e-3) -> Classifier:
    """Train on the held-out split only (deterministic for a seed on a given machine)."""
    images, labels = data.load_digits("heldout")
    x, y = data.to_float(images), labels
    model = Classifier(nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    steps = epochs * (len(x) // batch)
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        xa = _shift(x[perm], rng)
        for i in range(0, len(x) - batch + 1, batch):
            params, opt, _ = step(params, opt, jnp.asarray(xa[i:i + batch]), jnp.asarray(y[perm[i:i + batch]]))
    return nnx.merge(graphdef, params)


def save_classifier(model: Classifier, path=CLASSIFIER_FILE) -> None:
    from turbojax.convert.atomic import commit_file
    flat = {".".join(str(k) for k in p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    commit_file(Path(path), lambda f: np.savez(f, **flat))


@functools.lru_cache(maxsize=2)
def load_classifier(path=CLASSIFIER_FILE) -> Classifier:
    """The shipped classifier (`path`); trains one (about 20 s) when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return train_classifier()
    model = Classifier(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    with np.load(path) as z:
        stored = {k: z[k] for k in z.files}
    flat = []
    for p, v in nnx.to_flat_state(state):
        key = ".".join(str(k) for k in p)
        if key not in stored or stored[key].shape != v[...].shape:
            raise ValueError(f"{path}: parameter {key} missing or mis-shaped; re-create it with train_classifier()")
        flat.append((p, v.replace(jnp.asarray(stored[key]))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    model = nnx.merge(graphdef, state)
    f = model.features(x)
    return f, model.head(f)


def features_and_logits(images_uint8, classifier: Classifier | None = None, batch: int = 1000):
    """(features [N, 128], logits [N, 10]) of uint8 digits [N, 32, 32, 1], as float64 numpy arrays."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (data.IMAGE_SIZE, data.IMAGE_SIZE, 1):
        raise ValueError(f"images must be uint8 [N, {data.IMAGE_SIZE}, {data.IMAGE_SIZE}, 1], got {images.dtype} "
                         f"{images.shape}")
    graphdef, state = nnx.split(classifier or load_classifier())
    feats, logits = [], []
    for i in range(0, len(images), batch):
        xb = data.to_float(images[i:i + batch])
        n = len(xb)
        if n < batch and len(images) > batch:  # one compiled shape for every chunk
            xb = np.concatenate([xb, np.full((batch - n,) + xb.shape[1:], -1.0, np.float32)])
        f, l = _apply(graphdef, state, jnp.asarray(xb))
        feats.append(np.asarray(f, np.float64)[:n])
        logits.append(np.asarray(l, np.float64)[:n])
    return np.concatenate(feats), np.concatenate(logits)


def frechet_distance(f1, f2) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (float64, eigen-decomposition based:
    Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), which stays real and stable)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1h @ s2 @ s1h
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _pairwise(a, b):
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d, 0, None))


def _mean_pairwise(f) -> float:
    if len(f) < 2:
        return float("nan")
    d = _pairwise(f, f)
    return float(d.sum() / (len(f) * (len(f) - 1)))


def _knn_radius(f, k: int) -> np.ndarray:
    d = _pairwise(f, f)
    return np.sort(d, axis=1)[:, min(k, len(f) - 1)]  # column 0 is the point itself


def _coverage(points, anchors, k: int) -> float:
    """Fraction of `points` within the k-NN radius of at least one anchor (k shrinks to `len(anchors) - 1` for tiny
    sets, so that small smoke runs still give a number)."""
    if len(anchors) < 2 or len(points) == 0:
        return float("nan")
    r = _knn_radius(anchors, min(k, len(anchors) - 1))
    return float((_pairwise(points, anchors) <= r[None, :]).any(axis=1).mean())


@functools.lru_cache(maxsize=1)
def reference():
    """Features and labels of the 4,000 real train digits (the FD / diversity / recall reference)."""
    images, labels = data.load_digits("train")
    feats, logits = features_and_logits(images)
    return feats, labels, logits


def evaluate(images_uint8, labels, *, k: int = KNN_K) -> dict:
    """Metrics of generated digits `images_uint8` that were asked to show classes `labels` (see module doc)."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images_uint8):
        raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
    feats, logits = features_and_logits(images_uint8)
    rfeats, rlabels, _ = reference()
    div, rec, prec = [], [], []
    for c in np.unique(labels):
        g, r = feats[labels == c], rfeats[rlabels == c]
        div.append(_mean_pairwise(g) / _mean_pairwise(r))
        rec.append(_coverage(r, g, k))
        prec.append(_coverage(g, r, k))
    return {"fd": frechet_distance(feats, rfeats), "accuracy": float((logits.argmax(1) == labels).mean()),
            "diversity": float(np.nanmean(div)), "recall": float(np.nanmean(rec)),
            "precision": float(np.nanmean(prec)), "num": int(len(labels))}
