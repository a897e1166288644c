"""Face unlock on the device: enrol an owner, then unlock for that owner only, on the deployed model.

Pure logic (no I/O): `geometry` (landmark measures), `liveness` (blink and head-motion challenges),
`decision` (frame verdicts and the lock state machine), `calibration` (threshold for a target FAR).
I/O: `sources` (camera, video file, RTSP, image folder), `store` (owner-only template files), `analyzer`
(the shared FacePipeline stages plus the embedder, timed), `overlay` (annotated video, window),
`session` (the unlock loop), `enroll`, `calibrate`, `reembed` (after a federated round).
"""
