"""Building blocks shared by methods: the EMA teacher and its schedules (``teacher``), the
per-step schedules (``schedules``), metrics read from predictions (``metrics``), fixed position
embeddings (``positions``), the masked-autoencoder decoders (``decoders``) and the log-mel front end
of the audio encoders (``spectrogram``)."""
