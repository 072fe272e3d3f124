"""grouter inside transformers (v5) MoE models.

`import grouter.hf` registers ``"grouter"`` in transformers' experts interface, so any model whose
experts class uses ``@use_experts_implementation`` runs on the compiled ops with
``model.set_experts_implementation("grouter")`` or ``from_pretrained(..., experts_implementation=
"grouter")``.

`attach(model, grouter_model)` makes every MoE block route by the Grouter: routes are computed once
per forward from the model's ``input_ids`` (and ``attention_mask``), one routing plan serves every
layer, and during cached generation each new token is routed from its whole prefix by the
Grouter's own cache, which follows the model's. `attach(model, None)` + `set_routes` feeds routes
from outside (pre-dispatch). `save_pretrained` / `from_pretrained` keep the Grouter with the model.
"""

from .attach import attach, detach, set_routes
from .attachment import attachment_of
from .experts import experts_forward, register
from .persist import from_pretrained, save_pretrained

__all__ = ["register", "experts_forward", "attach", "detach", "set_routes", "attachment_of", "save_pretrained",
           "from_pretrained"]

register()
