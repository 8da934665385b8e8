"""The paper's analyses on committed embeddings: metrics (pure), editing, plots and the report."""
