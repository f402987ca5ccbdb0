"""One file per dashboard page; each defines `render(ctx)` and runs it when Streamlit executes the file."""
