# moeviz demo image: trains the demo MoE on CPU, records it, serves the dashboard on port 8501.
#
#   docker build -t moeviz .
#   docker run --rm -p 8501:8501 moeviz                          # demo (~3 min on 2 cores), then the dashboard
#   docker run --rm -p 8501:8501 -v "$PWD/runs:/runs" moeviz \
#       moeviz dashboard /runs --host 0.0.0.0                    # serve runs recorded elsewhere
#
# Then open http://localhost:8501. Runs written to /runs survive the container when /runs is a mounted volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # corpus extracts ship in the source tree (not in the wheel); corpus + tokenizer are cached at build time
    MOEVIZ_DATA_DIR=/opt/moeviz/data \
    MOEVIZ_CACHE=/opt/moeviz/cache \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false

WORKDIR /opt/moeviz

# CPU-only torch first, from PyTorch's own index (the PyPI wheel would pull the CUDA libraries, ~3 GB more).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Dependencies before the source, so that editing code does not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY pyproject.toml README.md ./
COPY moeviz ./moeviz
COPY collectors ./collectors
COPY app ./app
COPY data ./data
RUN pip install --no-deps . \
    # build the corpus (stdlib code, Shakespeare, Italian fortunes, math) and its tokenizer once, into the image
    && python -c "from moeviz.demo import DemoConfig, prepare_data; prepare_data(DemoConfig())" \
    && mkdir -p /runs

VOLUME ["/runs"]
EXPOSE 8501

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"

# The demo trains both runs (with and without the aux loss), then serves the dashboard on all interfaces.
CMD ["moeviz", "demo", "--out", "/runs", "--host", "0.0.0.0", "--port", "8501"]
