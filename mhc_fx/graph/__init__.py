"""What the stages share about graphs: capture to ATen (Dynamo's graph through ``make_fx``, or
``torch.export``) and what a node computes (:mod:`~mhc_fx.graph.ops`). Conversion, the
``mhc`` backend and export read graphs through this package, never through each other's
modules."""
