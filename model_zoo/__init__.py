"""FaceFed model zoo: MobileFaceNet + ArcFace, face datasets, client partitions, local training, metrics and
checkpoints. Import the submodules (model_zoo.data, model_zoo.train, ...); this package imports none of them
eagerly so that torch-free users (model_zoo.metrics, model_zoo.partition) stay cheap to import."""
