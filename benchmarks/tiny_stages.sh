# Sourced by gpu_cascade.sh (SMOKE=1) and device_paths.sh: --set options that shrink the
# configs/mnist stages to sizes a CPU trains in seconds (16 px base, 16 -> 32 px
# super-resolution, 2 steps), so that the very commands of a GPU run can be checked anywhere.
TINY=(--set training.batch_size=4 --set training.max_steps=2 --set training.log_every=1 --set sampling.steps=2
      --set "training.sample_guidance=[1]" --set training.mixed_precision=auto --set sampling.mixed_precision=auto
      --set text_encoder.max_length=8 --set text_encoder.dtype=float32 --set unet.base_channels=16
      --set "unet.channel_mults=[1, 2]" --set unet.num_head_channels=16 --set unet.dropout=0.0)
TINY_BASE=("${TINY[@]}" --set unet.image_size=16 --set unet.num_res_blocks=1 --set "unet.attention_resolutions=[8]"
           --set "unet.cross_attention_resolutions=[8]")
TINY_SR=("${TINY[@]}" --set unet.image_size=32 --set super_resolution.low_res_size=16 --set "unet.num_res_blocks=[1, 1]"
         --set unet.attention_resolutions=null --set unet.cross_attention_resolutions=null)
