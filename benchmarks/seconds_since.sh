# Sourced by the device scripts (gpu_cascade.sh, device_paths.sh, gpu.sh): seconds_since START
# prints the wall time since START (from `date +%s.%N`) to a tenth of a second.
seconds_since() { awk -v start="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - start }'; }
