"""The moeviz dashboard (Streamlit). Start it with `moeviz dashboard PATH`.

The app only composes: a widget value goes to a `moeviz` query or analysis, the DataFrame to a `moeviz.charts`
figure, the figure to `st.plotly_chart`. Connections and query results are cached in `app.state`.
"""
