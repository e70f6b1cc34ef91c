# Craftax Baselines on the CPU. The default command is the README's quickstart (PPO on
# Craftax-Classic-Symbolic, about 500k steps); any other command runs in its place.
#
#   docker build -t craftax-baselines .
#   docker run --rm -v "$PWD/runs:/app/runs" -v craftax-jax:/cache craftax-baselines
#   docker run --rm -v "$PWD/runs:/app/runs" craftax-baselines python -m world_models.dreamer --preset debug
#
# runs/ is written under /app (mount it to keep the results); /cache keeps JAX's compiled programs,
# so only the first run of a program compiles it. EXTRAS adds optional dependencies, e.g.
# --build-arg EXTRAS=offline,tools; the GPU variant is in README.md, "Container".
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CRAFTAX_JAX_CACHE=/cache/jax

WORKDIR /app
# An editable install: presets are read from configs/ beside the packages (utils.config.CONFIG_ROOT).
COPY . .
ARG EXTRAS=""
RUN pip install -e ".${EXTRAS:+[$EXTRAS]}"

CMD ["python", "-m", "online_rl.ppo", "--preset", "quickstart"]
