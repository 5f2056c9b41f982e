"""Feature interpretation: activation store, label-rule classification, dashboards, and the LoRA lens."""
