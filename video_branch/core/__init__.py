"""The core maths of the engine: pure tensor and numpy functions, no configuration, models, ranks, rewards or I/O.

schedule (sigmas), sde (steps and log-probs), tree (structure and counts), credit (fusion and advantages), pruning
(trained edges), ovf (Expand-and-Prune selection), objectives (edge and sample losses), lr (learning-rate
multipliers), surrogate and nft (sample objectives' maths), stats (confidence intervals), errors
(:class:`CoreError`).
"""
