"""recbalance models: embeddings, dense arch and DCNv2 interaction (arches), task sides
(heads: shared bottom, MMoE, PLE; drgrad: DRGrad's split-MMoE), the ranker that joins them
at a balance point, and the `[model]` keys (config). Light on purpose: the config imports
`models.config` without TorchRec."""
