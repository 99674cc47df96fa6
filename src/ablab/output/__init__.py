"""Output: what people read -- the terminal tables, the HTML report and its figures, MLflow.

Owns: terminal output with rich (``terminal``), the report's data and page (``report``,
``templates/``), figures drawn from computed results (``figures``), number formatting
(``formatting``) and MLflow export (``mlflow_export``). Holds no statistics of its own.
May import: every lower layer.
"""
