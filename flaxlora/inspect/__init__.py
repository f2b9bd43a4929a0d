"""Inspecting params and adapters, in notebooks and from the command line.

    from flaxlora.inspect import analysis, diff, plots, summary
    summary.summary(base, adapter, method_names=method)   # table per leaf
    report = analysis.analyze(base, adapter, method)       # LoRA updates
    plots.heatmap(report); plots.spectra(report)
    diff.diff(adapter_before, adapter_after)

Modules: `summary` (shapes, bytes, shardings, trainable/frozen, owners;
treescope view), `analysis` (LoRA/DoRA updates from their factors),
`prompts` (nearest tokens of soft prompts), `diff`, `plots`, `runs` (a
finished run's base and adapter; used by `experiments/inspect_run.py`), `probe`
(linear probes of a frozen BERT's sentence vectors), and the helpers
`table` (text/HTML tables) and `tree` (path flattening).
"""
