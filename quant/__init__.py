"""Quantized weight types and the passes that make them (see DESIGN.md): model-free, weight-level.

    from quant import palettize, int8, llm_int8, calibrate, gptq
    import quant
    qparams = quant.apply_recipe(pipe.params, "palette-4bit")     # or a dict / JSON file; see quant.recipes
    quant.size_bytes(qparams["unet"])
    qparams = quant.apply_recipe(pipe.params, recipe, importance=imp)        # imp: sdjax.evaluation.fisher
    qparams = quant.apply_recipe(pipe.params, "palette-4bit-gptq", hessian=run)  # run(params) drives calibration
    qparams = quant.apply_recipe(pipe.params, "qat-4bit", finetune=tune)  # tune: sdjax.evaluation.qat_recipe
    qparams = quant.lora_branch.apply(qparams, ["style.safetensors"], pipe.configs)  # LoRA beside, not merged
    quant.io.save(pipe, "out")                                     # quantized folder; sdjax.load reads it

The workflows that drive a pipeline (calibration runs, Fisher sensitivities, the evaluator, sweeps,
the report) live in ``sdjax.evaluation``, above this package.
"""
from . import calibrate, finetune, gptq, int8, llm_int8, palettize  # noqa: F401
from . import recipes  # noqa: F401  (the recipe format)
from . import io  # noqa: F401
from . import allocation, apply, lora_branch, mixed_bit  # noqa: F401
from .apply import apply_recipe, plan, size_bytes  # noqa: F401
from .recipes import PRESETS, Recipe, RecipeError, parse as parse_recipe  # noqa: F401
