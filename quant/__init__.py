"""Quantized weight types and the passes that make them (see DESIGN.md).

    from quant import palettize, int8, llm_int8, calibrate, sensitivity
    import quant
    qparams = quant.apply_recipe(pipe.params, "palette-4bit")     # or a dict / JSON file; see quant.recipes
    quant.size_bytes(qparams["unet"])
    imp = sensitivity.fisher(pipe, prompts)                        # for {"method": "palettize", "sensitive": true}
    qparams = quant.apply_recipe(pipe.params, recipe, importance=imp)
    qparams = quant.apply_recipe(pipe.params, "palette-4bit-gptq", hessian=run)  # run(params) drives calibration
    quant.io.save(pipe, "out")                                     # quantized folder; sdjax.load reads it
"""
from . import calibrate, gptq, int8, llm_int8, palettize  # noqa: F401
from . import recipes  # noqa: F401
from . import io  # noqa: F401
from . import sensitivity  # noqa: F401
from .recipes import PRESETS, Recipe, RecipeError, apply_recipe, parse as parse_recipe, plan, size_bytes  # noqa: F401
