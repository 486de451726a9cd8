"""Evaluation: the paper's metrics with real metric models, the protocol runner, the report.

    from compinv.evaluation.evaluate import MetricChoice, evaluate
    evaluate("eval-out", run=["gen-out"], choice=MetricChoice())

Kept import-free so that building the CLI loads no model code; see docs/architecture.md.
"""
