# Sourced by the benchmark scripts that train and are run again to finish: pick_up RUN prints the
# flag that continues the training run in folder RUN where it stopped: --resume when it has a
# complete checkpoint, --overwrite when it stopped before its first one (config.yaml alone:
# nothing trained is lost), nothing for a new folder.
pick_up() {
  if compgen -G "$1/checkpoints/step_*" > /dev/null; then
    echo --resume
  elif [ -f "$1/config.yaml" ]; then
    echo --overwrite
  fi
}
