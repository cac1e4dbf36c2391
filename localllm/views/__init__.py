"""Pure renderers of typed results: Rich tables, progress bars, charts. No runtime, no store."""
