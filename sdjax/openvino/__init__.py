"""sdjax's UNet on OpenVINO's CPU plugin through OpenVINO's JAX frontend (a benchmark-only extra).

    from sdjax.openvino import compile_unet
    run = compile_unet(params, config, {"sample": (2, 64, 64, 4)}, precision="bf16")
    eps = run(x, t, ctx)                      # NHWC, like sdjax.unet.apply

``rewrite`` makes a traced sdjax function convertible; ``w8a8`` turns sdjax's W8A8 weights into
OpenVINO's int8 form; ``backend`` traces, converts and compiles. OpenVINO is imported only when a
model is compiled: without it, ``compile_unet`` raises ImportError naming ``pip install -e ".[bench]"``.
Nothing in sdjax imports this package."""


def compile_unet(*args, **kwargs):
    """See ``sdjax.openvino.backend.compile_unet``."""
    from sdjax.openvino import backend
    return backend.compile_unet(*args, **kwargs)
