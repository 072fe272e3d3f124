"""torchtitan integration (``pip install grouter[titan]``): a Grouter routes torchtitan's MoE layers.

    model = model_config.build()                       # Qwen3-MoE, DeepSeek-V3, ... (torchtitan)
    grouter.titan.convert(model, g)                    # fixed router, grouter dispatch and experts
    # ... parallelize (EP: torchtitan's own mesh wiring), build the optimizer, train as usual;
    # routes per step from the attached Grouter, set_routes, or a PredispatchedDataset batch.

One routing plan per step for all layers; under expert parallelism, the all-to-all splits of the
step are known before the step (no per-layer count exchange or device-to-host sync).
"""

from .convert import as_grouter_moe, convert, moe_layers
from .data import HostCounts, PredispatchedDataset
from .modules import FixedRouter, GrouterExperts, GrouterTokenDispatcher
from .parallel import expert_parallel
from .routes import BATCH_KEYS, EPSplits, StepRoutes, routes_of, set_routes

__all__ = ["convert", "moe_layers", "expert_parallel", "as_grouter_moe", "set_routes", "routes_of", "PredispatchedDataset", "HostCounts", "FixedRouter",
           "GrouterExperts", "GrouterTokenDispatcher", "StepRoutes", "EPSplits", "BATCH_KEYS"]
