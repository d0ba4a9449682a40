# Sourced by the device scripts (gpu_cascade.sh, device_paths.sh): switch NAME VALUE prints true
# or false for an on/off environment setting, so that COMPILE=1 and COMPILE=true mean the same
# everywhere; anything else is refused before a lent GPU's minutes go into a run.
switch() {
  case "$(printf '%s' "$2" | tr '[:upper:]' '[:lower:]')" in  # not ${2,,}: macOS ships bash 3
    1 | true | yes | on) echo true ;;
    "" | 0 | false | no | off) echo false ;;
    *) echo "error: $1 is '$2'; expected 1, true, yes or on to turn it on, or 0, false, no, off or nothing." >&2
       return 2 ;;
  esac
}
