"""Dashboard: Streamlit pages over analyzer queries (run with `tracetune dashboard`)."""
