"""MLflow models-from-code entry of a tabular regression run's model (see ``loralab.tracking.pyfunc``)."""

from mlflow.models import set_model

from loralab.tracking.pyfunc import TabularRegressor

set_model(TabularRegressor())
