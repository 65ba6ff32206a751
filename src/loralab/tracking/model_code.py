"""MLflow models-from-code entry of every model loralab logs: MLflow runs this file to build the model when it is
loaded. The model it sets hands every call to the task's own ``PythonModel`` class, named in the model's artifact
``served_by.txt`` (``module.Class``, e.g. ``loralab.tracking.pyfunc.Classifier``): a class is imported, nothing
unpickled."""

from mlflow.models import set_model

from loralab.tracking.pyfunc import TaskModel

set_model(TaskModel())
