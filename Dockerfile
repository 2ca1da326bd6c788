# The sharechat server: `docker build -t sharechat .`, or `docker compose up` with compose.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Dependencies first, from setup.cfg alone: this layer is rebuilt only when they change,
# not on every change of the code.
COPY setup.cfg pyproject.toml ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); print(c['options']['install_requires'])" > requirements.txt \
    && pip install -r requirements.txt \
    && useradd --system --no-create-home --shell /usr/sbin/nologin sharechat

# The code last. `pip install .` also puts sql/ where the installed server looks for it
# (share/sharechat/sql).
COPY README.md ./
COPY sql sql
COPY sharechat sharechat
RUN pip install --no-deps . && rm -rf /src

WORKDIR /tmp
USER sharechat
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/livez' % os.environ.get('PORT', '8080'), timeout=2)"]
CMD ["sharechat", "serve"]
