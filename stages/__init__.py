"""What runs on a device: encoders, the denoising loop, VAE decoding, clarity metrics, video I/O.

Stages are plain classes with small typed inputs and outputs. They never import ray, so they run
in-process in tests and unchanged inside the actors of `cluster/`.
"""
