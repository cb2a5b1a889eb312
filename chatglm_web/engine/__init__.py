"""The engine: continuous batching of generation requests on one loaded model.

Owns admission (how many run and wait), the scheduler (chunked prefill, then one decode step for every
running request), the model's forward for those steps (``step``: a lean forward with fused projections,
``forward``; its decode step replayed as CUDA graphs on a GPU, ``graphs``), the KV slots, sampling,
the typed events a request streams and the reasons it ends, and the ways to run it: in this process
(``scheduler``), in a process of its own (``process``) or on Spaces' ZeroGPU (``zero_gpu``).

May import: ``generation``, ``settings``, ``families`` (to load a model in the engine process) and itself.
Nothing above it (backends, api, page, server).
"""
