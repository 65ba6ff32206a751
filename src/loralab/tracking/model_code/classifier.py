"""MLflow models-from-code entry of a classification run's model (see ``loralab.tracking.pyfunc``)."""

from mlflow.models import set_model

from loralab.tracking.pyfunc import Classifier

set_model(Classifier())
