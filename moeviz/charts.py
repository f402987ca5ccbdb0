"""Plotly figures for moeviz DataFrames: one function per chart, DataFrame in, `plotly.graph_objects.Figure` out.

The dashboard only composes (widget → analysis → DataFrame → chart here → `st.plotly_chart`), and notebooks can
call the same functions. Every figure has a title, axis titles with units, and hover text that names what a mark
is, so a screenshot stands on its own. No analysis math happens here: a chart only reshapes columns it is given.
An empty DataFrame gives a figure that says there is nothing to show rather than raising.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from moeviz.errors import MoevizError

# A qualitative palette long enough for 64 experts (Plotly's Dark24 + Light24 + Alphabet 16).
EXPERT_COLORS: list[str] = list(px.colors.qualitative.Dark24) + list(px.colors.qualitative.Light24) + list(
    px.colors.qualitative.Alphabet
)[:16]
SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"
# A ratio to uniform (× uniform) is never below 0: its scale runs 0 … max with 1 white, blue below, red above
_RATIO_BLUE = ("#2166ac", "#92c5de")  # 0, ½ (of the way to 1)
_RATIO_RED = ("#f4a582", "#b2182b")  # half way to the top, the top
RATIO_WHITE = "#f7f7f7"


def ratio_colorscale(zmax: float) -> list[list]:
    """A colour scale for ratios on [0, zmax] (zmax ≥ 1): 0 deep blue, 1 white, zmax deep red. A symmetric range
    around 1 (zmid=1) would run below 0, which a ratio cannot be, and paint a dead expert (0×) mid-blue."""
    one = 1.0 / max(float(zmax), 1.0)
    if one >= 1.0:
        return [[0.0, _RATIO_BLUE[0]], [0.5, _RATIO_BLUE[1]], [1.0, RATIO_WHITE]]
    return [[0.0, _RATIO_BLUE[0]], [one / 2, _RATIO_BLUE[1]], [one, RATIO_WHITE], [(one + 1) / 2, _RATIO_RED[0]],
            [1.0, _RATIO_RED[1]]]


def ratio_range(values) -> float:
    """The top of a ratio scale: the largest value, at least 2 (so that 1, white, sits at most half way up)."""
    v = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(float)
    v = v[np.isfinite(v)]
    return float(max(2.0, v.max())) if len(v) else 2.0
TRACE_TYPES = ("bar", "heatmap", "sankey", "scatter", "table")  # every trace type these charts draw


def _white_template() -> go.layout.Template:
    """Plotly's plotly_white template, with the trace defaults of TRACE_TYPES only.

    The full template carries defaults for 24 trace types: assigning it took 36 ms per figure (validation and
    copies), 0.3 s of the eight charts a Specialization layer change rebuilds. This one takes a third of that
    and draws the same charts, since no other trace type is used."""
    white = pio.templates["plotly_white"]
    return go.layout.Template(layout=white.layout, data={t: white.data[t] for t in TRACE_TYPES if t in white.data})


TEMPLATE = "moeviz"  # registered with Plotly under this name
pio.templates[TEMPLATE] = _white_template()
_LAYOUT = dict(margin=dict(l=60, r=30, t=60, b=50), hovermode="closest")


def use_moeviz_template_by_default() -> None:
    """Make moeviz's template Plotly's default in this process, as the dashboard does (it draws moeviz charts only).

    Figures then carry no template of their own and Plotly adds it when it writes them out: 3 ms a figure instead
    of ~20 ms, since assigning a template to a figure validates and copies it. Elsewhere (notebooks) each figure
    gets the template assigned, and the user's own Plotly default is left alone."""
    pio.templates.default = TEMPLATE


class ChartDataError(MoevizError, ValueError):
    """A chart was given a DataFrame without the columns it draws."""


def _need(df: pd.DataFrame, cols: Iterable[str | None], chart: str) -> None:
    missing = [c for c in cols if c is not None and c not in df.columns]
    if missing:
        raise ChartDataError(f"{chart} needs columns {missing}; the DataFrame has {list(df.columns)}")


def _finish(fig: go.Figure, title: str, x_title: str | None = None, y_title: str | None = None, **layout) -> go.Figure:
    template = {} if pio.templates.default == TEMPLATE else {"template": TEMPLATE}
    fig.update_layout(title=dict(text=title, x=0.01), **{**_LAYOUT, **template, **layout})
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


def empty_figure(title: str, message: str = "Nothing recorded for this selection") -> go.Figure:
    """A titled figure with a centred message, for selections with no rows."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=16))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _finish(fig, title)


def _fmt(col: str) -> str:
    return col.replace("_", " ")


def _series_name(col: str, value) -> str:
    """A legend entry: a number needs its column to mean anything ("layer 2", "expert 5"); a name stands alone
    ("aux", "domain", "compile", not "run id aux", "variable domain", "way compile")."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    return f"{_fmt(col)} {value:g}" if isinstance(value, (float, np.floating)) else f"{_fmt(col)} {value}"


def _hover(cols: Sequence[str], start: int = 0) -> str:
    return "<br>".join(f"{_fmt(c)}: %{{customdata[{start + i}]}}" for i, c in enumerate(cols))


# --- generic building blocks ------------------------------------------------------------------------------------


def _cell_grids(df: pd.DataFrame, x: str, y: str, cols: Sequence[str], xs: Sequence, ys: Sequence) -> list[np.ndarray]:
    """Each column of `cols` as a [len(ys), len(xs)] grid of the cell's first row: the first (z) as floats with
    NaN where no row falls, the others as objects with None. One placement for all columns: a pivot_table per column took ~10 ms, 0.13 s of the heat maps a
    Specialization layer change redraws."""
    d = df.drop_duplicates([y, x])
    yi = pd.Index(list(ys)).get_indexer(d[y])
    xi = pd.Index(list(xs)).get_indexer(d[x])
    keep = (yi >= 0) & (xi >= 0)
    grids = []
    for i, c in enumerate(cols):
        if i == 0:  # the heat map's z: floats, NaN where no row (or a null) falls
            g = np.full((len(ys), len(xs)), np.nan)
            g[yi[keep], xi[keep]] = pd.to_numeric(d[c], errors="coerce").to_numpy(float, na_value=np.nan)[keep]
        else:
            g = np.full((len(ys), len(xs)), None, dtype=object)
            g[yi[keep], xi[keep]] = d[c].to_numpy(object)[keep]
        grids.append(g)
    return grids


def heatmap(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    z: str,
    title: str,
    x_title: str,
    y_title: str,
    z_title: str,
    hover: Sequence[str] = (),
    zmid: float | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: str | None = None,
    text_format: str | None = None,
    reverse_y: bool = True,
    ratio: bool = False,
    y_order: Sequence | None = None,
) -> go.Figure:
    """A heat map of z over (x, y) from long-format rows; extra `hover` columns appear on hover.

    `ratio`: z is a ratio to uniform (never below 0): the colour scale runs 0 … max with 1 white
    (`ratio_colorscale`). `y_order`: the rows in this order (default: sorted values of `y`)."""
    _need(df, [x, y, z, *hover], title)
    if df.empty:
        return empty_figure(title)
    xs = sorted(df[x].unique())
    ys = list(y_order) if y_order is not None else sorted(df[y].unique())
    grids = _cell_grids(df, x, y, [z, *hover], xs, ys)
    if ratio:
        zmin, zmax, zmid = 0.0, ratio_range(df[z]), None
        colorscale = ratio_colorscale(zmax)
    custom = np.stack(grids[1:], axis=-1) if hover else None
    hovertemplate = f"{_fmt(x)}: %{{x}}<br>{_fmt(y)}: %{{y}}<br>{z_title}: %{{z:.4g}}"
    if hover:
        hovertemplate += "<br>" + _hover(hover)
    trace = go.Heatmap(
        z=grids[0],
        x=[str(v) for v in xs],
        y=[str(v) for v in ys],
        customdata=custom,
        hovertemplate=hovertemplate + "<extra></extra>",
        colorscale=colorscale or (DIVERGING if zmid is not None else SEQUENTIAL),
        zmid=zmid,
        zmin=zmin,
        zmax=zmax,
        colorbar=dict(title=dict(text=z_title)),
        texttemplate=text_format,
    )
    fig = go.Figure(trace)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed" if reverse_y else True)
    return _finish(fig, title, x_title, y_title)


def lines(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    color: str | None,
    title: str,
    x_title: str,
    y_title: str,
    hover: Sequence[str] = (),
    references: dict[str, float] | None = None,
    dash: str | None = None,
    markers: bool = True,
    log_y: bool = False,
    fit_y: Sequence[float] | None = None,
) -> go.Figure:
    """One line per value of `color` (e.g. layer or run), with dotted horizontal reference lines by label.

    `fit_y`: the y axis spans the data and these values only (e.g. uniform 1), not every reference line: a
    reference far from the data (a lower bound) would squash the curves into a strip. A reference outside that
    span is named in a note at the bottom ("… is below the axis") instead of drawn."""
    _need(df, [x, y, color, dash, *hover], title)
    if df.empty:
        return empty_figure(title)
    fig = go.Figure()
    groups = df.groupby([c for c in (color, dash) if c], sort=True) if (color or dash) else [((None,), df)]
    dash_styles = ["solid", "dash", "dot", "dashdot", "longdash"]
    dash_values = sorted(df[dash].unique()) if dash else []
    color_values = sorted(df[color].unique()) if color else []
    palette = px.colors.qualitative.Plotly
    for i, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values(x)
        parts = []
        if color:
            parts.append(_series_name(color, key[0]))
        if dash:
            parts.append(_series_name(dash, key[-1]))
        name = ", ".join(parts) or y
        custom = g[list(hover)].to_numpy(object) if hover else None
        template = f"{name}<br>{_fmt(x)}: %{{x}}<br>{y_title}: %{{y:.5g}}"
        if hover:
            template += "<br>" + _hover(hover)
        fig.add_trace(
            go.Scatter(
                x=g[x],
                y=g[y],
                name=name,
                mode="lines+markers" if markers and len(g) <= 200 else "lines",
                line=dict(
                    dash=dash_styles[dash_values.index(key[-1]) % len(dash_styles)] if dash else None,
                    color=palette[color_values.index(key[0]) % len(palette)] if color and dash else None,
                ),
                customdata=custom,
                hovertemplate=template + "<extra></extra>",
            )
        )
    y_range = None
    if fit_y is not None and not log_y:
        vals = np.concatenate([pd.to_numeric(df[y], errors="coerce").to_numpy(float), np.asarray(list(fit_y), float)])
        vals = vals[np.isfinite(vals)]
        if len(vals):
            lo, hi = float(vals.min()), float(vals.max())
            pad = 0.06 * (hi - lo) or 0.05 * max(abs(hi), 1e-9)
            y_range = [lo - pad, hi + pad]
            fig.update_yaxes(range=y_range)
    off_axis = []
    for label, value in (references or {}).items():
        if value is None:
            continue
        if y_range is not None and not y_range[0] <= float(value) <= y_range[1]:
            off_axis.append(f"{label} = {value:.4g} ({'below' if value < y_range[0] else 'above'} the axis)")
            continue
        _reference_line(fig, float(value), f"{label} = {value:.4g}")
    if off_axis:
        fig.add_annotation(text="; ".join(off_axis), xref="paper", yref="paper", x=0, y=0, xanchor="left",
                           yanchor="bottom", showarrow=False, font=dict(size=11, color="gray"),
                           bgcolor="rgba(255,255,255,0.85)")
    if log_y:
        fig.update_yaxes(type="log")
    _integer_ticks(fig, df[x])
    return _finish(fig, title, x_title, y_title, legend=dict(title=None))


def _reference_line(fig: go.Figure, value: float, label: str, **kwargs) -> None:
    """A dotted horizontal reference line; its label on a white box above the line at the right, drawn over the
    data so that lines and markers never hide it."""
    fig.add_hline(y=value, line_dash="dot", line_color="gray", annotation_text=label, annotation_position="top right",
                  annotation=dict(bgcolor="rgba(255,255,255,0.85)", font=dict(size=11, color="#444")), **kwargs)


def _integer_ticks(fig: go.Figure, xs: pd.Series) -> None:
    """Steps and k are integers: no 0.5 ticks between them."""
    v = pd.to_numeric(xs, errors="coerce").dropna()
    if len(v) and np.all(np.mod(v, 1) == 0):
        span = float(v.max() - v.min())
        fig.update_xaxes(tickformat=",d", dtick=1 if span <= 20 else None)


def bars(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    title: str,
    x_title: str,
    y_title: str,
    color: str | None = None,
    hover: Sequence[str] = (),
    reference: tuple[str, float] | None = None,
    barmode: str = "group",
    categorical_x: bool = True,
    legend_prefix: bool = True,
) -> go.Figure:
    """Bars of y per x (grouped by `color`), with an optional dotted reference line (label, value)."""
    _need(df, [x, y, color, *hover], title)
    if df.empty:
        return empty_figure(title)
    fig = go.Figure()
    groups = df.groupby(color, sort=True) if color else [(None, df)]
    for key, g in groups:
        key = key[0] if isinstance(key, tuple) else key
        name = (_series_name(color, key) if legend_prefix else str(key)) if color else y
        template = f"{_fmt(x)}: %{{x}}<br>{y_title}: %{{y:.4g}}"
        if color:
            template = f"{name}<br>" + template
        if hover:
            template += "<br>" + _hover(hover)
        fig.add_trace(
            go.Bar(
                x=g[x].astype(str) if categorical_x else g[x],
                y=g[y],
                name=name,
                customdata=g[list(hover)].to_numpy(object) if hover else None,
                hovertemplate=template + "<extra></extra>",
            )
        )
    if reference is not None and reference[1] is not None:
        _reference_line(fig, float(reference[1]), f"{reference[0]} = {reference[1]:.4g}")
    if categorical_x:
        fig.update_xaxes(type="category")
    return _finish(fig, title, x_title, y_title, barmode=barmode, showlegend=bool(color))


def small_multiples(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    facet: str,
    color: str | None,
    title: str,
    x_title: str,
    y_title: str,
    max_cols: int = 4,
    references: dict[str, float] | None = None,
    color_order: Sequence | None = None,
    hover_label: str | None = None,
    line_styles: dict | None = None,
) -> go.Figure:
    """One small panel per value of `facet` (e.g. layer), sharing axes, one line per `color` value.

    `color_order`: the color values in legend order (default: sorted); `hover_label`: a column whose first value
    in each line names it on hover (the expert behind '#1' in this panel); `line_styles`: color value -> Plotly
    line dict for lines drawn unlike the others (an 'others' sum in grey, a found expert in black)."""
    _need(df, [x, y, facet, color, hover_label], title)
    if df.empty:
        return empty_figure(title)
    facets = sorted(df[facet].unique())
    n_cols = min(max_cols, len(facets))
    n_rows = -(-len(facets) // n_cols)
    fig = make_subplots(
        rows=n_rows, cols=n_cols, shared_xaxes=True, shared_yaxes=True,
        subplot_titles=[f"{_fmt(facet)} {f}" for f in facets], vertical_spacing=0.12 / max(1, n_rows - 1) if n_rows > 1 else 0.1,
        horizontal_spacing=0.04,
    )
    color_values = (list(color_order) if color_order is not None else sorted(df[color].unique())) if color else [None]
    palette = EXPERT_COLORS
    groups = dict(iter(df.sort_values(x).groupby([facet, color] if color else [facet], sort=False)))
    traces, rows, cols, shapes = [], [], [], []
    shown_names: set[str] = set()  # each legend entry once, from the first panel that has the line
    for i, f in enumerate(facets):
        r, c = divmod(i, n_cols)
        for j, cv in enumerate(color_values):
            g = groups.get((f, cv) if color else (f,))
            if g is None:
                continue
            name = _series_name(color, cv) if color else y
            label = str(g[hover_label].iloc[0]) if hover_label else name
            style = (line_styles or {}).get(cv) or dict(color=palette[j % len(palette)], width=1.5)
            traces.append(go.Scatter(
                x=g[x].to_numpy(), y=g[y].to_numpy(), mode="lines", name=name, legendgroup=name,
                showlegend=color is not None and name not in shown_names, line=style,
                hovertemplate=f"{_fmt(facet)} {f}, {label}<br>{_fmt(x)}: %{{x}}<br>{y_title}: %{{y:.4g}}<extra></extra>",
            ))
            shown_names.add(name)
            rows.append(r + 1)
            cols.append(c + 1)
        axes = fig.get_subplot(r + 1, c + 1)
        xref, yref = axes.xaxis.plotly_name.replace("axis", ""), axes.yaxis.plotly_name.replace("axis", "")
        for value in (references or {}).values():
            if value is not None:  # plain shape dicts: add_hline per panel cost 35 ms each (0.28 s of 0.94 s)
                shapes.append(dict(type="line", xref=f"{xref} domain", x0=0, x1=1, yref=yref, y0=float(value),
                                   y1=float(value), line=dict(dash="dot", color="gray")))
    fig.add_traces(traces, rows=rows, cols=cols)
    fig.update_layout(shapes=shapes)
    for c in range(1, n_cols + 1):
        fig.update_xaxes(title_text=x_title, row=n_rows, col=c)
    for r in range(1, n_rows + 1):
        fig.update_yaxes(title_text=y_title, row=r, col=1)
    height = max(300, 220 * n_rows + 80)
    if color is None:
        return _finish(fig, title, height=height)
    # the legend in rows above the panels, never a scrolling column beside them that hides the last entries
    per_row = 12
    legend_rows = -(-len(color_values) // per_row)
    height += 22 * legend_rows
    top = 70 + 22 * legend_rows
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.0 + 30 / (height - top - 50), x=0,
                                  xanchor="left", entrywidth=70, title=None))
    return _finish(fig, title, height=height, margin=dict(l=60, r=30, t=top + 30, b=50))


# --- charts with their own shape --------------------------------------------------------------------------------


def _expert_colorscale(n_experts: int) -> list[list]:
    """A stepwise colorscale giving expert e (0..n-1) its own palette colour on a heat map with zmin=-0.5."""
    n = max(1, n_experts)
    scale: list[list] = []
    for e in range(n):
        color = EXPERT_COLORS[e % len(EXPERT_COLORS)]
        scale += [[e / n, color], [(e + 1) / n, color]]
    return scale


def token_routes(df: pd.DataFrame, *, n_experts: int, title: str = "Experts chosen for each token", max_label: int = 12) -> go.Figure:
    """The Mixtral paper's figure: a sequence's tokens in order, one row per MoE layer, each cell coloured by the
    token's top (slot 0) expert; the token texts label the x axis (position and text); hover lists the token and
    every chosen expert and weight.

    The texts are axis labels, not cell labels: a column is one token in every layer, so the cells repeated each
    text once per layer (512 SVG texts for 64 tokens and 8 layers, most of the 0.25 s a draw took in the
    browser, and unreadable at the dashboard's column width); the axis draws it once per token.

    `df` is `moeviz.store.catalog.sequence_routes` output: pos, text, layer, slot, expert, weight.
    """
    _need(df, ["pos", "text", "layer", "slot", "expert", "weight"], title)
    if df.empty:
        return empty_figure(title, "This sequence has no per-token detail")
    positions = sorted(df["pos"].unique())
    layers = sorted(df["layer"].unique())
    top = df[df["slot"] == 0].pivot_table(index="layer", columns="pos", values="expert", aggfunc="first")
    top = top.reindex(index=layers, columns=positions)
    texts = df[df["slot"] == 0].drop_duplicates("pos").set_index("pos")["text"].reindex(positions).fillna("")
    label = [_visible(t)[:max_label] for t in texts]
    routes = (
        df.sort_values(["pos", "layer", "slot"])
        .assign(pair=lambda d: "e" + d["expert"].astype(str) + d["weight"].map(_weight_note))
        .groupby(["layer", "pos"])["pair"]
        .agg(", ".join)
        .unstack("pos")
        .reindex(index=layers, columns=positions)
        .fillna("")
    )
    token_grid = np.array([[_visible(t) for t in texts]] * len(layers), dtype=object)  # [layers, tokens]
    custom = np.stack([token_grid, routes.to_numpy(object)], axis=-1)
    fig = go.Figure(
        go.Heatmap(
            z=top.to_numpy(float),
            x=[str(p) for p in positions],
            y=[str(l) for l in layers],
            customdata=custom,
            hovertemplate="position %{x}, layer %{y}<br>token: %{customdata[0]}<br>top expert: %{z}"
            "<br>experts (weight): %{customdata[1]}<extra></extra>",
            colorscale=_expert_colorscale(n_experts),
            zmin=-0.5,
            zmax=n_experts - 0.5,
            xgap=1,
            ygap=2,
            colorbar=dict(title=dict(text="top expert"), tickvals=list(range(n_experts)), ticktext=[str(e) for e in range(n_experts)]),
        )
    )
    fig.update_xaxes(type="category", title_text="token in the sequence (position and text)", tickmode="array",
                     tickvals=[str(p) for p in positions], ticktext=[f"{p} {t}" for p, t in zip(positions, label)],
                     tickangle=-90, tickfont=dict(size=11))
    fig.update_yaxes(type="category", autorange="reversed", title_text="MoE layer")
    # no layout width: the dashboard stretches the chart to its column anyway, and a figure width (60 px a token)
    # made the browser draw it first at that width (about 4,000 px), then again at the column's
    return _finish(fig, title, height=max(300, 40 * len(layers) + 200))  # +60 px: the vertical token labels


def _contrast_text(color: str) -> str:
    """Black or white, whichever reads better on `color` (a #rrggbb or rgb() colour), by its relative luminance."""
    rgb = _rgb(color)
    if rgb is None:
        return "#000"
    lum = sum(w * (c / 255) ** 2.2 for w, c in zip((0.2126, 0.7152, 0.0722), rgb))
    return "#000" if lum > 0.2 else "#fff"


def _rgb(color: str) -> tuple[int, int, int] | None:
    if color.startswith("#") and len(color) == 7:
        return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    if color.startswith("rgb"):
        parts = color[color.index("(") + 1 : color.index(")")].split(",")
        return tuple(int(float(p)) for p in parts[:3])  # type: ignore[return-value]
    return None


def _weight_note(w) -> str:
    """' (0.412)' after an expert id; nothing where the weight is unknown (runs imported from engine logs)."""
    return "" if pd.isna(w) else f" ({w:.3f})"


def token_text_html(df: pd.DataFrame, *, n_experts: int) -> str:
    """The Mixtral paper's figure as HTML: the sequence's text itself, once per MoE layer, each token on the
    background colour of its top (slot 0) expert, with a legend of the experts' colours. Hovering a token (its
    `title`) names the token, the layer and every chosen expert with its gate weight.

    Real text, not axis labels: it wraps to the page's width and reads as the sentence it is. Spaces are kept
    (`white-space: pre-wrap`), a newline token shows as ⏎ and breaks the line, a tab as ⇥. Every token carries
    `data-layer`, `data-pos` and `data-expert`, so a test (or a user's script) can read back what is drawn.
    `df` is `moeviz.store.catalog.sequence_routes` output: pos, text, layer, slot, expert, weight."""
    import html

    _need(df, ["pos", "text", "layer", "slot", "expert", "weight"], "token text")
    if df.empty:
        return "<p><em>This sequence has no per-token detail.</em></p>"
    d = df.sort_values(["layer", "pos", "slot"])
    texts = d[d["slot"] == 0].drop_duplicates("pos").set_index("pos")["text"]
    pairs = d.assign(pair=lambda x: "e" + x["expert"].astype(str)
                     + x["weight"].map(lambda w: "" if pd.isna(w) else f" {w:.3f}"))
    chosen = pairs.groupby(["layer", "pos"], sort=True)["pair"].agg(", ".join)
    top = d[d["slot"] == 0].set_index(["layer", "pos"])["expert"]
    colors = [EXPERT_COLORS[e % len(EXPERT_COLORS)] for e in range(max(1, n_experts))]

    def span(layer, pos) -> str:
        text = "" if pd.isna(texts.get(pos)) else str(texts.get(pos))
        expert = top.get((layer, pos))
        shown = html.escape(text.replace("\n", "⏎").replace("\t", "⇥") or "∅")
        tip = html.escape(f"token {pos}: {text!r} · layer {layer}\nexperts (weight): {chosen.get((layer, pos), '')}",
                          quote=True)
        if expert is None or pd.isna(expert):
            style = "background:#eee;color:#555"
            expert_attr = ""
        else:
            bg = colors[int(expert) % len(colors)]
            style = f"background:{bg};color:{_contrast_text(bg)}"
            expert_attr = f' data-expert="{int(expert)}"'
        brk = "<br>" if "\n" in text else ""
        return (f'<span class="moeviz-token" data-layer="{int(layer)}" data-pos="{int(pos)}"{expert_attr} '
                f'title="{tip}" style="{style};border-radius:3px;padding:1px 0;white-space:pre-wrap">{shown}</span>'
                + brk)

    positions = sorted(texts.index)
    rows = []
    for layer in sorted(d["layer"].unique()):
        tokens = "".join(span(layer, p) for p in positions)
        rows.append(
            f'<div class="moeviz-layer" data-layer="{int(layer)}" style="display:flex;gap:0.8em;margin:0 0 0.7em 0">'
            f'<div style="flex:0 0 4.5em;color:#666;font-size:0.85em;padding-top:0.15em">layer {int(layer)}</div>'
            f'<div style="flex:1;line-height:1.9;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;'
            f'font-size:0.92em">{tokens}</div></div>'
        )
    legend = " ".join(
        f'<span style="background:{c};color:{_contrast_text(c)};border-radius:3px;padding:1px 6px;'
        f'font-size:0.85em">expert {e}</span>' for e, c in enumerate(colors))
    return (f'<div class="moeviz-tokens"><div style="margin-bottom:0.8em">Top expert: {legend}</div>'
            + "".join(rows) + "</div>")


def _visible(text) -> str:
    """Token text with whitespace made visible (a leading space as '·', newline as '⏎')."""
    s = "" if text is None else str(text)
    return s.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")


def sankey(
    df: pd.DataFrame,
    *,
    source: str,
    target: str,
    value: str,
    source_label: str,
    target_label: str,
    title: str,
    value_title: str = "tokens",
) -> go.Figure:
    """Flow between two categorical columns (e.g. expert at layer a → expert at layer b), widths by `value`."""
    _need(df, [source, target, value], title)
    if df.empty or df[value].sum() == 0:
        return empty_figure(title)
    srcs = sorted(df[source].unique())
    tgts = sorted(df[target].unique())
    labels = [f"{source_label} {s}" for s in srcs] + [f"{target_label} {t}" for t in tgts]
    s_index = {s: i for i, s in enumerate(srcs)}
    t_index = {t: len(srcs) + i for i, t in enumerate(tgts)}
    colors = [EXPERT_COLORS[i % len(EXPERT_COLORS)] for i in range(len(srcs))]
    colors += [EXPERT_COLORS[i % len(EXPERT_COLORS)] for i in range(len(tgts))]
    link_colors = [_rgba(EXPERT_COLORS[srcs.index(s) % len(EXPERT_COLORS)], 0.35) for s in df[source]]
    fig = go.Figure(
        go.Sankey(
            arrangement="snap",
            node=dict(label=labels, color=colors, pad=8, thickness=14,
                      hovertemplate="%{label}<br>" + value_title + ": %{value}<extra></extra>"),
            link=dict(
                source=[s_index[s] for s in df[source]],
                target=[t_index[t] for t in df[target]],
                value=df[value].astype(float).tolist(),
                color=link_colors,
                hovertemplate="%{source.label} → %{target.label}<br>" + value_title + ": %{value}<extra></extra>",
            ),
        )
    )
    return _finish(fig, title, height=max(400, 22 * max(len(srcs), len(tgts)) + 120))


def _rgba(color: str, alpha: float) -> str:
    if color.startswith("#") and len(color) == 7:
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
        return f"rgba({r},{g},{b},{alpha})"
    if color.startswith("rgb("):
        return color.replace("rgb(", "rgba(").replace(")", f",{alpha})")
    return color


def curve_with_marker(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    color: str | None,
    marker_x: float | None,
    title: str,
    x_title: str,
    y_title: str,
    marker_label: str = "current",
) -> go.Figure:
    """Line(s) of y over a continuous x (e.g. drop rate over capacity factor) with a vertical marker at the
    current choice."""
    fig = lines(df, x=x, y=y, color=color, title=title, x_title=x_title, y_title=y_title, markers=False)
    if marker_x is not None and not df.empty:
        fig.add_vline(x=float(marker_x), line_dash="dash", line_color="black",
                      annotation_text=f"{marker_label} = {marker_x:g}", annotation_position="top right")
    return fig


def table_figure(df: pd.DataFrame, *, title: str, max_rows: int = 50) -> go.Figure:
    """A small table as a figure (for exports where a chart is expected)."""
    if df.empty:
        return empty_figure(title)
    d = df.head(max_rows)
    fig = go.Figure(go.Table(header=dict(values=[_fmt(str(c)) for c in d.columns]),
                             cells=dict(values=[d[c].astype(str).tolist() for c in d.columns])))
    return _finish(fig, title)


# --- load and balance ---------------------------------------------------------------------------------------------

IMBALANCE_METRICS: dict[str, str] = {
    "max_vio": "MaxVio (max − mean) / mean",
    "max_over_mean": "busiest expert / mean expert",
    "cv": "coefficient of variation of load",
    "norm_entropy": "normalised entropy of load (1 = uniform)",
    "dead_share": "share of dead experts",
    "top_n_coverage": "share of the top-k busiest experts",
}


def load_heatmap(df: pd.DataFrame, *, value: str = "load_fraction", title: str | None = None,
                 found: int | None = None) -> go.Figure:
    """Layer × expert heat map of the load (`moeviz.analyses.load.load_matrix` rows); hover shows the counts.

    Sized to its rows (a 58-layer model gets a taller chart, ~10 px a layer, so every row stays readable);
    `found`: an expert whose column is outlined (the dashboard's "find expert")."""
    title = title or "Share of assignments per expert and layer"
    z_title = {"load_fraction": "share of layer's assignments", "relative_load": "load × E (1 = uniform)"}.get(value, _fmt(value))
    ratio = value == "relative_load"
    hover = [c for c in ("assigned", "first_choice", "tokens") if c in df.columns]
    fig = heatmap(df, x="expert", y="layer", z=value, title=title, x_title="expert", y_title="MoE layer",
                  z_title=z_title, hover=hover, ratio=ratio, zmin=None if ratio else 0)
    n_layers = df["layer"].nunique() if "layer" in df.columns else 0
    if n_layers > 24:
        fig.update_layout(height=min(1000, 160 + 11 * n_layers))
    if found is not None and not df.empty and (df["expert"] == found).any():
        i = sorted(df["expert"].unique()).index(found)  # a category axis places column i at i
        fig.add_shape(type="rect", xref="x", yref="paper", x0=i - 0.5, x1=i + 0.5, y0=0, y1=1,
                      line=dict(color="black", width=2), fillcolor="rgba(0,0,0,0)")
        fig.add_annotation(x=i, y=1.0, yref="paper", text=f"expert {found}", showarrow=False, yanchor="bottom")
    return fig


def load_small_multiples(df: pd.DataFrame, *, value: str = "load_fraction") -> go.Figure:
    """Per-layer panels of each expert's load over steps (`moeviz.analyses.load.expert_load` with by_step=True)."""
    _need(df, ["step", "layer", "expert", value], "load over steps")
    ref = None
    if value == "load_fraction" and not df.empty and "n_experts" in df.columns:
        ref = {"uniform 1/E": 1.0 / float(df["n_experts"].max())}
    return small_multiples(df, x="step", y=value, facet="layer", color="expert",
                           title="Load per expert over steps, one panel per layer", x_title="step",
                           y_title="share of assignments", references=ref)


def top_load_small_multiples(df: pd.DataFrame, *, value: str = "load_fraction", found: int | None = None) -> go.Figure:
    """Per-layer panels of the busiest experts' load over steps and the others' summed
    (`moeviz.analyses.top_experts.top_expert_load`): colours by rank in the layer (#1 is the busiest of each
    panel, hover names the expert), the others in grey, the `found` expert in black."""
    _need(df, ["step", "layer", "expert", "busy_rank", value, "label"], "load of the busiest experts")
    d = df.copy()
    others = d["expert"] < 0
    is_found = (d["expert"] == found) if found is not None else pd.Series(False, index=d.index)
    top = ~others & ~is_found  # the found expert is shown besides the top N: it does not make N larger
    n = int(d.loc[top, "busy_rank"].max()) if top.any() else 0
    d["series"] = np.where(others, "others", np.where(is_found, f"expert {found}", "#" + d["busy_rank"].astype(str)))
    tops = sorted({int(r) for r in d.loc[top, "busy_rank"]})
    order = [f"#{r}" for r in tops] + (["others"] if others.any() else []) + ([f"expert {found}"] if is_found.any() else [])
    styles = {"others": dict(color="#9e9e9e", width=1.5, dash="dot"), f"expert {found}": dict(color="black", width=3)}
    ref = None
    if value == "load_fraction" and not d.empty:
        ref = {"uniform 1/E": 1.0 / float(d["n_experts"].max())}
    shown = f"the {n} busiest experts of each layer" + (" and the others summed" if others.any() else "")
    return small_multiples(d, x="step", y=value, facet="layer", color="series", color_order=order,
                           hover_label="label", line_styles=styles,
                           title=f"Load over steps: {shown}, one panel per layer", x_title="step",
                           y_title="share of assignments", references=ref)


def imbalance_lines(df: pd.DataFrame, metric: str = "max_vio") -> go.Figure:
    """One imbalance metric (`moeviz.analyses.load.imbalance` column) per layer over steps."""
    label = IMBALANCE_METRICS.get(metric, _fmt(metric))
    refs = {"balanced": 0.0} if metric in ("max_vio", "cv", "dead_share") else {"balanced": 1.0} if metric in ("max_over_mean", "norm_entropy") else None
    hover = [c for c in ("tokens", "n_experts", "dead_experts") if c in df.columns]
    return lines(df, x="step", y=metric, color="layer", title=f"Imbalance per layer over steps: {label}",
                 x_title="step", y_title=label, hover=hover, references=refs)


def expert_load_bars(df: pd.DataFrame, *, value: str = "load_fraction", uniform: float | None = None) -> go.Figure:
    """Bars of each expert's load in one layer (or per layer as colours), with the uniform share marked."""
    color = "layer" if "layer" in df.columns and df["layer"].nunique() > 1 else None
    hover = [c for c in ("assigned", "tokens") if c in df.columns]
    return bars(df, x="expert", y=value, color=color, title="Load per expert", x_title="expert",
                y_title="share of the layer's assignments", hover=hover,
                reference=("uniform 1/E", uniform) if uniform else None)


# --- auxiliary losses ----------------------------------------------------------------------------------------------


def aux_loss_small_multiples(df: pd.DataFrame, *, value: str = "aux_loss") -> go.Figure:
    """Per-layer panels of the Switch loss over steps, with the uniform value 1 dotted."""
    return small_multiples(df, x="step", y=value, facet="layer", color=None,
                           title="Switch load-balancing loss over steps, one panel per layer", x_title="step",
                           y_title="E · Σ fᵢ Pᵢ (1 = uniform)", references={"uniform": 1.0})


def aux_loss_lines(
    df: pd.DataFrame,
    *,
    value: str = "aux_loss",
    color: str | None = "layer",
    title: str = "Switch load-balancing loss per layer",
    y_title: str = "E · Σ fᵢ Pᵢ (dimensionless)",
    uniform: float | None = 1.0,
    bound: float | None = None,
    bound_label: str = "true lower bound",
    dash: str | None = None,
) -> go.Figure:
    """A loss over steps per layer (or run), against the uniform value and the true lower bound for E and k."""
    refs = {}
    if uniform is not None:
        refs["uniform routing"] = uniform
    if bound is not None:
        refs[bound_label] = bound
    hover = [c for c in ("tokens", "worst_layer", "mean_entropy") if c in df.columns]
    return lines(df, x="step", y=value, color=color, dash=dash, title=title, x_title="step", y_title=y_title,
                 hover=hover, references=refs, fit_y=[] if uniform is None else [uniform])


def z_loss_lines(df: pd.DataFrame) -> go.Figure:
    """Router z-loss (mean logsumexp² of the router logits) per layer over steps."""
    return lines(df, x="step", y="z_loss", color="layer" if "layer" in df.columns else None,
                 title="Router z-loss per layer", x_title="step", y_title="mean logsumexp(logits)² (logit units²)",
                 hover=[c for c in ("tokens",) if c in df.columns])


def entropy_lines(df: pd.DataFrame, *, n_experts: int | None = None) -> go.Figure:
    """Mean router entropy per layer over steps, against log E (an undecided router)."""
    import math

    refs = {"log E (uniform router)": math.log(n_experts)} if n_experts and n_experts > 1 else None
    return lines(df, x="step", y="mean_entropy", color="layer" if "layer" in df.columns else None,
                 title="Router entropy per layer", x_title="step", y_title="mean entropy of softmax(logits) (nats)",
                 references=refs)


# --- capacity ------------------------------------------------------------------------------------------------------


def _capacity_at(cf: float | None, capacity: int | None) -> str:
    if capacity is not None:
        return f" at a fixed capacity of {capacity:,} per expert"
    return f" at capacity factor {cf:g}" if cf is not None else ""


def drop_bars(df: pd.DataFrame, *, by: str, cf: float | None = None, capacity: int | None = None) -> go.Figure:
    """Share of assignments dropped per `by` value (layer, domain, ...) at one capacity factor (or fixed capacity)."""
    at = _capacity_at(cf, capacity)
    return bars(df, x=by, y="drop_rate", title=f"Dropped share per {_fmt(by)}{at}", x_title=_fmt(by),
                y_title="dropped / assigned", hover=[c for c in ("dropped", "assigned") if c in df.columns])


def drop_heatmap(df: pd.DataFrame, *, cf: float | None = None, capacity: int | None = None) -> go.Figure:
    """Layer × expert heat map of the dropped share at one capacity factor (or fixed capacity)."""
    at = _capacity_at(cf, capacity)
    return heatmap(df, x="expert", y="layer", z="drop_rate", title=f"Dropped share per expert and layer{at}",
                   x_title="expert", y_title="MoE layer", z_title="dropped / assigned", zmin=0,
                   hover=[c for c in ("dropped", "assigned") if c in df.columns], colorscale="Reds")


def drop_curve(df: pd.DataFrame, *, current_cf: float | None = None, color: str | None = None) -> go.Figure:
    """Drop rate over capacity factors (`moeviz.analyses.capacity.drop_curve`), the current choice marked."""
    return curve_with_marker(df, x="capacity_factor", y="drop_rate", color=color, marker_x=current_cf,
                             title="Dropped share over capacity factor", x_title="capacity factor (× uniform share)",
                             y_title="dropped / assigned", marker_label="chosen CF")


# --- comparing runs ------------------------------------------------------------------------------------------------


def compare_heatmaps(df: pd.DataFrame, *, value: str = "relative_load", runs: Sequence[str] | None = None,
                     x: str = "expert", y: str = "layer", z_title: str | None = None, title: str | None = None,
                     zmid: float | None = None, ratio: bool | None = None) -> go.Figure:
    """The same layer × expert heat map for each run, side by side on one colour scale. `ratio` (default: for
    `relative_load`): a ratio to uniform, on a 0 … max scale with 1 white (`ratio_colorscale`)."""
    ratio = value == "relative_load" if ratio is None else ratio
    _need(df, ["run_id", x, y, value], "compare heat maps")
    runs = list(runs) if runs is not None else sorted(df["run_id"].unique())
    title = title or f"{_fmt(value)} per {x} and {y}, run by run"
    z_title = z_title or {"relative_load": "load × E (1 = uniform)", "load_fraction": "share of assignments"}.get(value, _fmt(value))
    if df.empty:
        return empty_figure(title)
    zmax = float(df[value].max()) if df[value].notna().any() else 1.0
    if ratio:  # one 0 … max scale for every run, 1 white
        zmax, zmid = ratio_range(df[value]), None
    scale = ratio_colorscale(zmax) if ratio else SEQUENTIAL if zmid is None else DIVERGING
    fig = make_subplots(rows=1, cols=len(runs), subplot_titles=[f"run {r}" for r in runs], horizontal_spacing=0.08)
    for i, r in enumerate(runs):
        d = df[df["run_id"] == r]
        if d.empty:
            continue
        grid = d.pivot_table(index=y, columns=x, values=value, aggfunc="first").sort_index()
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(float), x=[str(c) for c in grid.columns], y=[str(c) for c in grid.index],
                zmin=0 if zmid is None else None, zmax=zmax if zmid is None else None, zmid=zmid,
                colorscale=scale, showscale=i == 0, colorbar=dict(title=dict(text=z_title)),
                hovertemplate=f"run {r}<br>{_fmt(x)}: %{{x}}<br>{_fmt(y)}: %{{y}}<br>{z_title}: %{{z:.4g}}<extra></extra>",
            ),
            row=1, col=i + 1,
        )
        fig.update_xaxes(title_text=_fmt(x), type="category", row=1, col=i + 1)
        fig.update_yaxes(title_text=_fmt(y) if i == 0 else None, type="category", autorange="reversed", row=1, col=i + 1)
    return _finish(fig, title)


def compare_domain_share(df: pd.DataFrame, *, runs: Sequence[str], layer: int) -> go.Figure:
    """Expert × domain share against uniform (`domain_share` of two runs) in one layer, run by run."""
    d = df[df["layer"] == layer]
    d = d.assign(domain=d["domain"].fillna("(none)"))
    return compare_heatmaps(d, value="ratio", runs=runs, x="expert", y="domain", z_title="share ÷ uniform share",
                            title=f"Expert share of each domain in layer {layer}, against uniform, run by run", ratio=True)


def compare_lines(df: pd.DataFrame, *, y: str, y_title: str, title: str, x: str = "step") -> go.Figure:
    """A metric over steps, colour = layer, dash = run: two runs on the same axes."""
    return lines(df, x=x, y=y, color="layer" if "layer" in df.columns else None, dash="run_id", title=title,
                 x_title=x, y_title=y_title)


# --- specialization ------------------------------------------------------------------------------------------------


def domain_heatmap(df: pd.DataFrame, *, layer: int | None = None, value: str = "ratio") -> go.Figure:
    """Expert × domain heat map for one layer (`moeviz.analyses.specialization.domain_share`): the ratio to the uniform
    share (1 = what balanced routing gives, white), hover with the share and counts."""
    d = df if layer is None else df[df["layer"] == layer]
    d = d.assign(domain=d["domain"].fillna("(none)")) if "domain" in d.columns else d
    where = f" in layer {layer}" if layer is not None else ""
    z_title = "share ÷ uniform share" if value == "ratio" else _fmt(value)
    return heatmap(d, x="expert", y="domain", z=value, title=f"Expert share of each domain{where}, against uniform",
                   x_title="expert", y_title="domain", z_title=z_title, ratio=value == "ratio",
                   hover=[c for c in ("share", "uniform", "assigned", "tokens") if c in d.columns], reverse_y=True)


def position_heatmap(df: pd.DataFrame, *, layer: int | None = None) -> go.Figure:
    """Expert × position-bucket heat map for one layer (`position_share`), as a ratio to the uniform share.
    Rows in position order; a bucket of one position reads "5", a range "16–31", the last open one "512+"."""
    d = df if layer is None else df[df["layer"] == layer]
    order = None
    if not d.empty:
        hi = d["pos_hi"].astype("Int64")
        d = d.assign(positions=[_bucket_label(int(lo), None if pd.isna(h) else int(h)) for lo, h in zip(d["pos_lo"], hi)])
        order = d.sort_values(["bucket", "pos_lo"]).drop_duplicates("positions")["positions"].tolist()
    else:
        d = d.assign(positions=[])
    where = f" in layer {layer}" if layer is not None else ""
    return heatmap(d, x="expert", y="positions", z="ratio", title=f"Expert share by token position{where}, against uniform",
                   x_title="expert", y_title="token positions", z_title="share ÷ uniform share", ratio=True,
                   y_order=order, hover=[c for c in ("share", "assigned", "tokens") if c in d.columns])


def _bucket_label(lo: int, hi: int | None) -> str:
    """Positions lo … hi-1 as a label: "5" for one position, "16–31" for a range, "512+" when open-ended."""
    if hi is None:
        return f"{lo}+"
    return str(lo) if hi - 1 <= lo else f"{lo}–{hi - 1}"


def coactivation_heatmap(df: pd.DataFrame, *, layer: int | None = None) -> go.Figure:
    """P(j | i): how often expert j is chosen with expert i for the same token (`coactivation`), one layer."""
    d = df if layer is None else df[df["layer"] == layer]
    where = f" in layer {layer}" if layer is not None else ""
    hover = [c for c in ("tokens_ij", "tokens_i", "baseline") if c in d.columns]
    return heatmap(d, x="expert_j", y="expert_i", z="p_j_given_i", title=f"Co-activation P(expert j | expert i){where}",
                   x_title="expert j (chosen with i)", y_title="expert i", z_title="P(j | i)", zmin=0, hover=hover)


def consecutive_agreement_bars(df: pd.DataFrame, *, layer: int | None = None) -> go.Figure:
    """How often consecutive tokens agree (three measures) in one layer, next to the baseline of routing blind to
    the neighbour and to balanced routing (`consecutive_agreement`, Mixtral Table 5)."""
    measures = [("first", "same first choice", "baseline_first"),
                ("first_in_topk", "next first choice in top-k", "baseline_first_in_topk"),
                ("topk_overlap", "top-k sets overlap", None)]
    d = df if layer is None else df[df["layer"] == layer]
    rows = []
    for _, r in d.iterrows():
        for m, label, base in measures:
            if f"rate_{m}" not in d.columns:
                continue
            rows.append({"layer": r["layer"], "measure": label, "kind": "observed", "rate": r[f"rate_{m}"], "pairs": r["pairs"]})
            if base and base in d.columns:
                rows.append({"layer": r["layer"], "measure": label, "kind": "neighbour-blind baseline", "rate": r[base], "pairs": r["pairs"]})
            if f"uniform_{m}" in d.columns:
                rows.append({"layer": r["layer"], "measure": label, "kind": "uniform routing", "rate": r[f"uniform_{m}"], "pairs": r["pairs"]})
    long = pd.DataFrame(rows, columns=["layer", "measure", "kind", "rate", "pairs"])
    where = f" in layer {layer}" if layer is not None else ""
    return bars(long, x="measure", y="rate", color="kind", title=f"Consecutive tokens routed alike{where}, against chance",
                x_title="measure", y_title="share of consecutive token pairs", hover=["pairs"], legend_prefix=False)


def layer_flow_sankey(df: pd.DataFrame, layer_a: int, layer_b: int) -> go.Figure:
    """Sankey of tokens from the experts of layer a to those of layer b (`layer_flow`)."""
    return sankey(df, source="expert_a", target="expert_b", value="tokens", source_label=f"L{layer_a} e",
                  target_label=f"L{layer_b} e", title=f"Token flow from layer {layer_a} to layer {layer_b} (first choices)")


def per_layer_bars(df: pd.DataFrame, *, y: str, title: str, y_title: str, color: str | None = None,
                   reference: tuple[str, float] | None = None, hover: Sequence[str] = ()) -> go.Figure:
    """One bar per layer (grouped by `color`), e.g. vocabulary specialization, saturation, mutual information."""
    return bars(df, x="layer", y=y, color=color, title=title, x_title="MoE layer", y_title=y_title,
                reference=reference, hover=[h for h in hover if h in df.columns])


def top_tokens_bars(df: pd.DataFrame, *, layer: int, expert: int, by: str = "count") -> go.Figure:
    """The top tokens of one expert (`top_tokens`), ranked by count or lift."""
    d = df[(df["layer"] == layer) & (df["expert"] == expert) & (df["by"] == by)].sort_values("rank")
    d = d.assign(token=[_visible(t) if t is not None and t == t else str(i) for t, i in zip(d["text"], d["token_id"])])
    y = "count" if by == "count" else "lift"
    y_title = "occurrences routed to the expert" if by == "count" else "lift P(token | expert) / P(token)"
    fig = bars(d, x="token", y=y, title=f"Top tokens of expert {expert} in layer {layer}, by {by}", x_title="token",
               y_title=y_title, hover=[c for c in ("token_id", "token_count", "expert_share", "lift", "count") if c in d.columns],
               reference=("no preference", 1.0) if by == "lift" else None)
    fig.update_xaxes(categoryorder="array", categoryarray=d["token"].tolist())
    return fig


# --- bounds and the toy model --------------------------------------------------------------------------------------


def matrix_frame(weights: np.ndarray, chosen: np.ndarray | None = None) -> pd.DataFrame:
    """Long form (token, expert, weight, chosen) of a [tokens, experts] router-probability matrix."""
    w = np.asarray(weights, dtype=float)  # [tokens, experts]
    tok, exp = np.meshgrid(np.arange(w.shape[0]), np.arange(w.shape[1]), indexing="ij")
    picked = np.zeros(w.shape, dtype=bool)
    if chosen is not None:
        c = np.asarray(chosen).reshape(w.shape[0], -1)  # [tokens, k]
        picked[np.arange(w.shape[0])[:, None], c] = True
    return pd.DataFrame({"token": tok.ravel(), "expert": exp.ravel(), "weight": w.ravel(), "chosen": picked.ravel()})


def bound_matrix(df: pd.DataFrame, *, title: str = "Router probabilities of the optimal batch") -> go.Figure:
    """Heat map of a bound construction's router probabilities (token × expert), each chosen (top-k) expert marked
    with a ring, so that a chosen expert at probability ~0 (a tie at the k-th place, in the ε → 0 limit) shows."""
    d = df.assign(chosen=np.where(df["chosen"], "chosen", "not chosen"))
    fig = heatmap(d, x="expert", y="token", z="weight", title=title, x_title="expert", y_title="token of the batch",
                  z_title="router probability", hover=["chosen"], zmin=0, zmax=float(max(df["weight"].max(), 1e-9)))
    picked = df[df["chosen"].astype(bool)] if not df.empty else df
    if len(picked):
        fig.add_trace(go.Scatter(
            x=picked["expert"].astype(str), y=picked["token"].astype(str), mode="markers", name="chosen (top-k)",
            marker=dict(symbol="circle-open", size=11, color="black", line=dict(width=2)),
            customdata=picked["weight"].to_numpy(float),
            hovertemplate="token %{y}, expert %{x}: chosen<br>router probability: %{customdata:.4g}<extra></extra>"))
        fig.update_layout(showlegend=True, legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1))
    return fig


def bound_curve(df: pd.DataFrame, *, current_experts: int | None = None) -> go.Figure:
    """The infimum of the Switch loss over E (one line per k), against Switch's claimed 1 and the blog's value
    (`moeviz.analyses.bounds.infimum_table`)."""
    _need(df, ["experts", "top_k", "infimum"], "bound curve")
    title = "Lower bound of the Switch loss over the number of experts"
    if df.empty:
        return empty_figure(title)
    rows = [df.assign(series="true infimum, k=" + df["top_k"].astype(str), value=df["infimum"])]
    if "blog_construction" in df.columns and df["blog_construction"].notna().any():
        b = df[df["blog_construction"].notna()]
        rows.append(b.assign(series="blog's construction (k=1)", value=b["blog_construction"].astype(float)))
    long = pd.concat(rows, ignore_index=True)
    fig = lines(long, x="experts", y="value", color="series", title=title, x_title="experts E (log scale)",
                y_title="E · Σ fᵢ Pᵢ", references={"Switch Transformers' claimed minimum": 1.0},
                hover=[c for c in ("fraction", "family", "tokens_used") if c in long.columns])
    for t in fig.data:
        t.name = t.name.replace("series ", "")
    # log axis, ticks at the powers of two in range: Plotly's own log ticks read "5, 10, 2, 5, 100, 2"
    lo, hi = float(df["experts"].min()), float(df["experts"].max())
    ticks = [2 ** i for i in range(0, 21) if lo <= 2 ** i <= hi] or sorted(df["experts"].unique().tolist())
    fig.update_xaxes(type="log", dtick=None, tickformat=None, tickmode="array", tickvals=ticks,
                     ticktext=[f"{t:,}" for t in ticks])
    if current_experts:  # a trace, not a shape: shapes on a log axis take log10 coordinates
        fig.add_trace(go.Scatter(x=[current_experts, current_experts], y=[0, 1.0], mode="lines", name=f"E = {current_experts}",
                                 line=dict(dash="dash", color="black"), hoverinfo="skip"))
    return fig


def observed_against_bounds(df: pd.DataFrame, *, infimum: float, blog: float | None = None,
                            value: str = "aux_loss") -> go.Figure:
    """A run's observed per-layer Switch loss over steps, with the uniform 1, the blog's value and the infimum."""
    refs = {"uniform (Switch's minimum)": 1.0, "true infimum": infimum}
    if blog is not None:
        refs["blog's construction"] = blog
    return lines(df, x="step", y=value, color="layer", title="This run's Switch loss against the bounds",
                 x_title="step", y_title="E · Σ fᵢ Pᵢ (dimensionless)", references=refs,
                 hover=[c for c in ("tokens",) if c in df.columns])


def _map_grid(d: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xs, ys, z[y, x]) of one decision map's long rows, placed by numpy (a pivot_table per map cost 10 ms).
    z is float32 rounded to 3 decimals: half the bytes of float64 to send and parse, more than the hover shows."""
    xs, xi = np.unique(d["x"].to_numpy(float), return_inverse=True)
    ys, yi = np.unique(d["y"].to_numpy(float), return_inverse=True)
    z = np.full((len(ys), len(xs)), np.nan, dtype=np.float32)
    z[yi, xi] = np.round(d["prob"].to_numpy(float), 3)
    return xs, ys, z


def decision_maps(df: pd.DataFrame, *, ways: Sequence[str] = ("compile", "run"), points: pd.DataFrame | None = None) -> go.Figure:
    """The toy MoE's decision maps: P(class 1) over the plane, one row per sparsification way, one column per k
    (`moeviz.analyses.toy.maps_frame`).

    All maps share one pair of axes, each panel shifted by its column and row, with the plane's own coordinates
    as tick labels under every panel and the panel titles as annotations. Twelve subplots (twelve axis pairs)
    took the browser about twice as long to draw inside the dashboard, which redraws the figure on every change
    of an input. The price: hover names the map and P(class 1), not the point's x and y.
    """
    _need(df, ["way", "k", "x", "y", "prob"], "decision maps")
    title = "Toy MoE decision maps: compile-time vs run-time sparsification to k experts"
    if df.empty:
        return empty_figure(title)
    ks = sorted(df[df["way"].isin(ways)]["k"].unique())
    names = {"compile": "compile time", "run": "run time", "dense": "dense"}
    groups = {key: d for key, d in df.groupby(["way", "k"], sort=False)}
    traces, notes, shift, rise = [], [], None, None
    for r, way in enumerate(ways):
        for c, k in enumerate(ks):
            d = groups.get((way, k))
            if d is None:
                continue
            xs, ys, z = _map_grid(d)
            if shift is None:  # panel pitch: the plane's extent plus a gap (between rows: room for the titles)
                lo, hi = float(min(xs[0], ys[0])), float(max(xs[-1], ys[-1]))
                shift, rise = (hi - lo) * 1.1, (hi - lo) * 1.25
            label = f"{names.get(way, way)}, k={k}"
            traces.append(go.Heatmap(
                z=z, x=xs + c * shift, y=ys - r * rise, zmin=0, zmax=1, colorscale=DIVERGING,
                showscale=not traces, colorbar=dict(title=dict(text="P(first quadrant)")),
                hovertemplate=f"{label}<br>P(class 1): %{{z:.3f}}<extra></extra>", name=label))
            notes.append(dict(text=label, x=(lo + hi) / 2 + c * shift, y=hi - r * rise, xref="x", yref="y",
                              yanchor="bottom", showarrow=False, font=dict(size=12)))
    fig = go.Figure(traces, layout=dict(annotations=notes))
    ticks = [lo, (lo + hi) / 2, hi]
    fig.update_xaxes(title_text="x", tickvals=[t + c * shift for c in range(len(ks)) for t in ticks],
                     ticktext=[f"{t:g}" for _ in ks for t in ticks], showgrid=False, zeroline=False)
    fig.update_yaxes(title_text="y", tickvals=[t - r * rise for r in range(len(ways)) for t in ticks],
                     ticktext=[f"{t:g}" for _ in ways for t in ticks], showgrid=False, zeroline=False,
                     scaleanchor="x", constrain="domain")
    return _finish(fig, title, height=260 * len(ways) + 120)


def accuracy_lines(df: pd.DataFrame) -> go.Figure:
    """Test accuracy of the toy MoE over k, one line per way (dense is one point at k = E)."""
    return lines(df, x="k", y="accuracy", color="way", title="Toy MoE test accuracy over the experts kept",
                 x_title="experts kept per input, k", y_title="test accuracy (share correct)")


# --- expert parallelism --------------------------------------------------------------------------------------------


def _placement_label(df: pd.DataFrame) -> pd.Series:
    """'balanced' or 'balanced + 2 replicas' (placement_comparison rows): a legend label, no arithmetic."""
    if "redundant" not in df.columns:
        return df["placement"]
    return df["placement"].where(df["redundant"] == 0, df["placement"] + " + " + df["redundant"].astype(str) + " replicas")


def gpu_load_heatmap(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """GPU × layer heat map of each GPU's share of the layer's assignments (`moeviz.analyses.placement.gpu_load`
    rows, pooled); hover shows the assignments and the layer's busiest/mean GPU."""
    title = title or "Share of each layer's assignments per GPU"
    return heatmap(df, x="gpu", y="layer", z="share", title=title, x_title="GPU", y_title="MoE layer",
                   z_title="share of layer's assignments", hover=["tokens", "max_over_mean"], zmin=0)


def busiest_gpu_lines(df: pd.DataFrame, *, layer: int) -> go.Figure:
    """The busiest GPU over the mean GPU per step, one line per placement, for one layer
    (`moeviz.analyses.placement.placement_comparison` rows with by_step=True)."""
    _need(df, ["step", "layer", "placement", "max_over_mean"], "busiest GPU over steps")
    d = df[df["layer"] == layer]
    d = d.assign(placement=_placement_label(d))
    return lines(d, x="step", y="max_over_mean", color="placement", hover=["busiest", "mean"],
                 title=f"Busiest GPU over the mean GPU per step, layer {layer}", x_title="step",
                 y_title="busiest GPU ÷ mean GPU", references={"even": 1.0})


def traffic_heatmap(df: pd.DataFrame, *, layer: int) -> go.Figure:
    """Source × GPU matrix of the token copies one layer dispatches (`moeviz.analyses.placement.dispatch_traffic`)."""
    _need(df, ["layer", "src", "gpu", "tokens"], "dispatch traffic")
    d = df[df["layer"] == layer]
    return heatmap(d, x="gpu", y="src", z="tokens", title=f"Token copies sent from each source to each GPU, layer {layer}",
                   x_title="destination GPU (holds the expert)", y_title="source GPU (where the token starts)",
                   z_title="token copies", hover=[c for c in ("bytes",) if c in d.columns], zmin=0)


def staleness_lines(df: pd.DataFrame, *, layer: int) -> go.Figure:
    """A placement fitted on early steps against one refitted every step and the contiguous layout, for one layer
    (`moeviz.analyses.placement.placement_staleness` rows)."""
    _need(df, ["step", "layer", "fitted", "refit", "contiguous"], "placement staleness")
    d = df[df["layer"] == layer]
    names = {"fitted": "balanced, fitted on the window", "refit": "balanced, refitted every step",
             "contiguous": "contiguous"}
    long = d.melt(id_vars=["step", "layer"], value_vars=list(names), var_name="placement", value_name="max_over_mean")
    long["placement"] = long["placement"].map(names)
    return lines(long, x="step", y="max_over_mean", color="placement",
                 title=f"How a fitted placement goes stale, layer {layer}", x_title="step",
                 y_title="busiest GPU ÷ mean GPU", references={"even": 1.0})


# ---------------------------------------------------------------------------------------------------- agreement

AGREEMENT_METRICS = {"set_agreement": "same expert set", "overlap": "mean overlap |A∩B|/k",
                     "first_choice_agreement": "same first choice"}


def agreement_bars(df: pd.DataFrame, *, title: str = "Routing agreement per layer (matched tokens)") -> go.Figure:
    """Per layer (moeviz.agreement.layer_agreement): the three agreement shares side by side, 0 … 1."""
    _need(df, ["layer", "tokens", *AGREEMENT_METRICS], title)
    if df.empty:
        return empty_figure(title)
    long = df.melt(id_vars=["layer", "tokens"], value_vars=list(AGREEMENT_METRICS), var_name="metric",
                   value_name="share")
    long["metric"] = long["metric"].map(AGREEMENT_METRICS)
    fig = bars(long, x="layer", y="share", color="metric", title=title, x_title="MoE layer",
               y_title="share of matched tokens", hover=["tokens"], legend_prefix=False)
    fig.update_yaxes(range=[0, 1.02])
    return fig


def disagreement_histogram(df: pd.DataFrame, *, title: str = "Layers whose expert set differs, per matched token"
                           ) -> go.Figure:
    """moeviz.agreement.token_disagreement: matched tokens by how many layers route them differently."""
    _need(df, ["layers_differing", "tokens"], title)
    if df.empty:
        return empty_figure(title)
    total = df["tokens"].sum()
    data = df.assign(share=df["tokens"] / total if total else 0.0)
    return bars(data, x="layers_differing", y="tokens", title=title, x_title="layers with a different expert set",
                y_title="matched tokens", hover=["share"])


def swap_heatmap(df: pd.DataFrame, *, layer: int, n_experts: int | None = None) -> go.Figure:
    """moeviz.agreement.swap_matrix: tokens whose expert_a (chosen only by a) was replaced by expert_b (only b)."""
    title = f"Swaps in layer {layer}: expert chosen only by A → expert chosen only by B"
    _need(df, ["expert_a", "expert_b", "tokens"], title)
    if df.empty:
        return empty_figure(title, "No swap: both sides chose the same experts for every matched token")
    if n_experts:  # every expert on both axes, so that two layers' maps read alike (and none is cut off)
        n = max(int(n_experts), int(df[["expert_a", "expert_b"]].max().max()) + 1)
        full = pd.MultiIndex.from_product([range(n), range(n)], names=["expert_a", "expert_b"])
        df = df.set_index(["expert_a", "expert_b"]).reindex(full, fill_value=0).reset_index()
    return heatmap(df, x="expert_b", y="expert_a", z="tokens", title=title, x_title="expert only B chose",
                   y_title="expert only A chose", z_title="tokens")


def position_agreement_heatmap(df: pd.DataFrame) -> go.Figure:
    """moeviz.agreement.position_agreement: share of matched tokens with the same expert set, layer x position."""
    title = "Same expert set by layer and position"
    _need(df, ["layer", "pos_lo", "set_agreement", "tokens"], title)
    if df.empty:
        return empty_figure(title)
    return heatmap(df, x="pos_lo", y="layer", z="set_agreement", title=title, x_title="position (bucket start)",
                   y_title="MoE layer", z_title="same set", hover=["tokens", "pos_hi"], zmin=0.0, zmax=1.0)


def _margin_label(lo: float, hi: float) -> str:
    if pd.isna(lo):
        return "unknown"
    if np.isinf(lo):
        return f"< {hi:g}"
    if np.isinf(hi):
        return f"≥ {lo:g}"
    return f"{lo:g}–{hi:g}"


def margin_agreement_bars(df: pd.DataFrame) -> go.Figure:
    """moeviz.agreement.margin_agreement: the share of decisions whose expert set differs, per margin bucket (how
    close the router's call was on the side that has margins); near-ties flip first."""
    side = df["margin_side"].dropna().iloc[0] if "margin_side" in df and df["margin_side"].notna().any() else None
    title = f"Disagreement by margin ({'A' if side == 'a' else 'B'}'s margins)" if side else "Disagreement by margin"
    _need(df, ["margin_lo", "margin_hi", "decisions", "set_agreement"], title)
    if df.empty or side is None:
        return empty_figure(title, "Neither side has margins (routes.margin is NULL: engine logs carry none; the "
                                   "Recorder writes them)")
    data = df.assign(bucket=[_margin_label(lo, hi) for lo, hi in zip(df["margin_lo"], df["margin_hi"])],
                     differing=1.0 - df["set_agreement"])
    fig = bars(data, x="bucket", y="differing", title=title, x_title="margin: p(last chosen) − p(best unchosen)",
               y_title="share of decisions with another set", hover=["decisions"])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def phase_agreement_bars(df: pd.DataFrame) -> go.Figure:
    """moeviz.agreement.phase_agreement: prompt against generated tokens (and those whose phase is unknown)."""
    title = "Prompt against generated tokens"
    _need(df, ["phase", "tokens", "set_agreement", "tokens_differing"], title)
    if df.empty:
        return empty_figure(title)
    long = df.melt(id_vars=["phase", "tokens"], value_vars=["set_agreement", "tokens_differing"], var_name="metric",
                   value_name="share")
    long["metric"] = long["metric"].map({"set_agreement": "decisions with the same set",
                                         "tokens_differing": "tokens with ≥ 1 differing layer"})
    fig = bars(long, x="phase", y="share", color="metric", title=title, x_title="phase", y_title="share",
               hover=["tokens"], legend_prefix=False)
    fig.update_yaxes(range=[0, 1.02])
    return fig


def disagreement_text_html(df: pd.DataFrame, *, n_layers: int) -> str:
    """A sequence's text, each token on a background as dark as the number of layers whose expert set differs
    between the two sides (white: none; dark red: all `n_layers`). Hovering a token gives its position, id and
    count. Every token carries `data-pos` and `data-differing` for tests. `df`: moeviz.agreement.token_view."""
    import html

    _need(df, ["pos", "token_id", "text", "layers", "layers_differing"], "token view")
    if df.empty:
        return "<p><em>No matched token in this sequence.</em></p>"
    n = max(1, int(n_layers))
    spans = []
    for r in df.itertuples():
        text = str(r.token_id) if r.text is None or pd.isna(r.text) else str(r.text)
        shown = html.escape(text.replace("\n", "⏎").replace("\t", "⇥") or "∅")
        share = min(1.0, int(r.layers_differing) / n)
        bg = f"rgba(200,30,30,{0.08 + 0.82 * share:.2f})" if r.layers_differing else "#f4f4f4"
        fg = "#fff" if share > 0.5 else "#111"
        tip = html.escape(f"token {int(r.pos)} (id {int(r.token_id)}): {text!r}\n{int(r.layers_differing)} of "
                          f"{int(r.layers)} layers differ", quote=True)
        spans.append(f'<span class="moeviz-token" data-pos="{int(r.pos)}" data-differing="{int(r.layers_differing)}" '
                     f'title="{tip}" style="background:{bg};color:{fg};border-radius:3px;padding:1px 0;'
                     f'white-space:pre-wrap">{shown}</span>' + ("<br>" if "\n" in text else ""))
    legend = (f'<div style="color:#666;font-size:0.85em;margin-top:0.5em">background: layers whose expert set '
              f'differs, from none (grey) to all {n} (dark red)</div>')
    return f'<div class="moeviz-disagreement" style="line-height:1.9">{"".join(spans)}</div>{legend}'


# --- balancing over time -------------------------------------------------------------------------------------------


def expert_bias_lines(df: pd.DataFrame, *, layer: int) -> go.Figure:
    """The selection bias of each expert of one layer over steps (`moeviz.analyses.balancing.expert_bias`)."""
    _need(df, ["step", "layer", "expert", "bias"], "expert bias")
    d = df[df["layer"] == layer]
    return lines(d, x="step", y="bias", color="expert", title=f"Selection bias per expert, layer {layer}",
                 x_title="step", y_title="bias added to the score before top-k", references={"no bias": 0.0},
                 markers=False)


def expert_load_lines(df: pd.DataFrame, *, layer: int) -> go.Figure:
    """Each expert's load over steps, as a multiple of the uniform share, for one layer
    (`moeviz.analyses.load.expert_load` rows), or the busiest experts' and the others' (`top_expert_load` rows,
    a wide model: 256 lines of 1,000 buckets are megabytes no one can read)."""
    _need(df, ["step", "layer", "expert", "relative_load"], "expert load over steps")
    d = df[df["layer"] == layer]
    if "label" in d.columns:  # `top_experts.top_expert_load` rows: the busiest experts and the others' mean
        d = d.sort_values(["busy_rank", "step"], kind="stable")
        return lines(d, x="step", y="relative_load", color="label", markers=False,
                     title=f"Load of the busiest experts over steps, layer {layer} (others: their mean)",
                     x_title="step", y_title="load ÷ uniform share (1 = even)", references={"uniform": 1.0},
                     hover=[c for c in ("assigned",) if c in d.columns])
    return lines(d, x="step", y="relative_load", color="expert", title=f"Load per expert over steps, layer {layer}",
                 x_title="step", y_title="load ÷ uniform share (1 = even)", references={"uniform": 1.0},
                 hover=[c for c in ("assigned",) if c in d.columns], markers=False)


def sequence_loss_lines(df: pd.DataFrame, *, convention: str, top_k: int = 1) -> go.Figure:
    """A per-sequence balance loss per layer over steps (`moeviz.analyses.aux_loss.sequence_balance_loss` rows of
    one convention), against its value for uniform routing (Switch: k; DeepSeek-V3's sequence-wise loss: 1)."""
    _need(df, ["step", "layer", "convention", "aux_loss"], "per-sequence balance loss")
    d = df[df["convention"] == convention]
    if convention == "switch":
        title, y_title, uniform = ("Switch loss per sequence (transformers' switch_transformers), per layer",
                                   "mean over sequences of E · Σ fᵢ Pᵢ", float(top_k))
    else:
        title, y_title, uniform = ("DeepSeek-V3 sequence-wise balance loss (without α), per layer",
                                   "mean over sequences of Σ fᵢ Pᵢ", 1.0)
    return aux_loss_lines(d, title=title, y_title=y_title, uniform=uniform)
