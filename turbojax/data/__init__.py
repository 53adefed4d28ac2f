"""Data for training: prompt files (`prompts`), real-image folders (`images`), batches from memory (`batches`,
`encoded`); the on-disk caches and their grain reader live in `turbojax.cache`."""
