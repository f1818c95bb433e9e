package ndop.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.interceptor.api.Hook;
import ca.uhn.fhir.interceptor.api.Interceptor;
import ca.uhn.fhir.interceptor.api.Pointcut;
import ca.uhn.fhir.rest.server.exceptions.UnprocessableEntityException;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import java.util.List;
import java.util.Set;
import java.util.stream.Collectors;
import org.hl7.fhir.instance.model.api.IBaseResource;

/**
 * HAPI's own instance validator (the HL7 validator with R4's StructureDefinitions and invariants, such
 * as Consent's ppc-1) run on every Consent and Provenance before it is stored. An error refuses that one write with
 * 422 and an OperationOutcome naming the element (its expression/location): in a batch Bundle only
 * that entry fails, in a transaction the whole Bundle rolls back.
 */
@Interceptor
public class ValidateOnWrite {

	private static final Set<String> CHECKED = Set.of("Consent", "Provenance");

	private final FhirContext context;
	private final FhirValidator validator;

	public ValidateOnWrite(FhirContext context, IValidationSupport validationSupport) {
		this.context = context;
		FhirInstanceValidator module = new FhirInstanceValidator(validationSupport);
		module.setAnyExtensionsAllowed(true);
		module.setNoTerminologyChecks(true); // no terminology server here: check structure and invariants
		validator = context.newValidator();
		validator.setValidateAgainstStandardSchema(false);
		validator.setValidateAgainstStandardSchematron(false);
		validator.registerValidatorModule(module);
	}

	@Hook(Pointcut.STORAGE_PRESTORAGE_RESOURCE_CREATED)
	public void created(IBaseResource resource) {
		check(resource);
	}

	@Hook(Pointcut.STORAGE_PRESTORAGE_RESOURCE_UPDATED)
	public void updated(IBaseResource oldResource, IBaseResource newResource) {
		check(newResource);
	}

	private void check(IBaseResource resource) {
		// what ndop-sync writes; other types (test Patients) skip it: HAPI 8.8 builds a new HL7 validator
		// for every resource (~0.1-0.2 s each here), which would slow the tests for nothing
		if (!CHECKED.contains(context.getResourceType(resource))) {
			return;
		}
		ValidationResult result = validator.validateWithResult(resource);
		// keep errors only: the outcome is what a client's dead letter quotes
		List<SingleValidationMessage> errors = result.getMessages().stream()
				.filter(m -> m.getSeverity() == ResultSeverityEnum.ERROR || m.getSeverity() == ResultSeverityEnum.FATAL)
				.collect(Collectors.toList());
		if (!errors.isEmpty()) {
			ValidationResult failed = new ValidationResult(context, errors);
			// A batch-response entry carries only the exception's message, not the outcome attached to it,
			// so the message itself names each failed element.
			String message = errors.stream()
					.map(m -> m.getMessage() + " (at " + m.getLocationString() + ")")
					.collect(Collectors.joining("; "));
			throw new UnprocessableEntityException(message, failed.toOperationOutcome());
		}
	}
}
