"""asymkd: disaggregated teacher serving + student training for LLM knowledge distillation."""

__version__ = "0.1.0"
