"""On-policy distillation (spec/opd.md): rollout scoring, losses, diagnostics and the engine loss."""
