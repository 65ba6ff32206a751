"""MLflow models-from-code entry of a text regression run's model (see ``loralab.tracking.pyfunc``)."""

from mlflow.models import set_model

from loralab.tracking.pyfunc import TextRegressor

set_model(TextRegressor())
