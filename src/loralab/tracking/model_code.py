"""MLflow models-from-code entry of every model loralab logs: MLflow runs this file to build the model when it is
loaded. It builds the ``PythonModel`` class that the model's config names (``python_model``: a ``module.Class``
path logged with the model, e.g. ``loralab.tracking.pyfunc.Classifier``); a class is imported, nothing unpickled."""

from mlflow.models import ModelConfig, set_model

from loralab.tracking.pyfunc import python_model

set_model(python_model(ModelConfig().get("python_model")))
